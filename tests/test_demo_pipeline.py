"""The `make demo` pipeline (delg_tf.demo) end to end, with a shorter training run.

One module-scoped run (train -> tau -> export -> extract -> retrieve/re-rank ->
evaluate -> PNGs) on the embedded default dataset, then checks on its outputs:
results.json structure and provenance, re-ranking does not lower mAP, RANSAC
inliers agree with the dataset's known homographies, and a rerun skips the
finished stages and reproduces the numbers.
"""
import json

import numpy as np
import pytest

from delg_tf import demo
from delg_tf.data.embedded import load_transforms
from delg_tf.data.revisitop import load_gnd
from delg_tf.evaluation.pipeline import load_store_features

# The demo exactly as `make demo` runs it (configs/demo.flags, ~1 min of training on
# 2 cores): the numbers checked here are the ones the README reports.
TEST_TRAIN_FLAGS = ()
# Agreement of RANSAC inliers with the true homographies (pixels in the 320-px views;
# keypoints are receptive-field centres on a 16-32 px grid, so a few px is the floor).
MAX_MEDIAN_GT_ERROR_PX = 12.0
MIN_FRACTION_WITHIN_THRESHOLD = 0.6
MIN_CORRECT_TOP1_PAIRS = 8


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = demo.DemoConfig(output_dir=str(out), train_flags=TEST_TRAIN_FLAGS,
                             progress=False)
    results_path = demo.main(config)
    return config, json.loads(results_path.read_text())


def test_outputs_and_results_json(demo_run):
    config, results = demo_run
    for name in (demo.RESULTS_JSON, demo.MATCHES_PNG, demo.GRID_PNG, demo.THRESHOLD_JSON):
        path = config.root / name
        assert path.is_file() and path.stat().st_size > 0, path
    assert (config.export_path / demo.SAVED_MODEL_FILE).is_file()
    for row in ("global", "reranked"):
        assert 0.0 <= results[row]["mAP"] <= 100.0
        assert results[row]["mAP"] == results[row]["medium"]["mAP"]
        for protocol in demo.PROTOCOLS:
            assert set(results[row][protocol]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    # tau is the trained run's attention median, not a constant.
    tau_info = json.loads((config.root / demo.THRESHOLD_JSON).read_text())
    assert results["attention_threshold"] == tau_info["tau"] > 0.0
    assert tau_info["values"] and "attention_median" in tau_info["source"]
    assert results["local_features_per_image"]["database_mean"] > 0


def test_reranking_does_not_lower_map(demo_run):
    """Queries of landmarks unseen in training, top-20 re-ranked (the demo's setting)."""
    _, results = demo_run
    assert results["train_landmarks"] == demo.DEFAULT_TRAIN_LANDMARKS
    assert results["num_queries"] > 0
    for protocol in demo.PROTOCOLS:
        assert results["reranked"][protocol]["mAP"] >= results["global"][protocol]["mAP"], (
            protocol, results["global"][protocol], results["reranked"][protocol])


def test_ransac_inliers_agree_with_known_homographies(demo_run):
    config, results = demo_run
    check = results["ground_truth_check"]
    assert check["pairs"] >= MIN_CORRECT_TOP1_PAIRS
    assert check["median_error_px"] <= MAX_MEDIAN_GT_ERROR_PX
    assert check["fraction_within_px"] >= MIN_FRACTION_WITHIN_THRESHOLD


def test_gt_reprojection_error_is_zero_for_exact_points(demo_run):
    """The helper's convention: points mapped by the true homography have 0 error."""
    from delg_tf.data.embedded import apply_homography, homography_between

    config, _ = demo_run
    paths = demo.dataset_paths(config)
    transforms = load_transforms(paths)
    gnd = load_gnd(paths.gnd, require_bbx=False)
    query = gnd["qimlist"][-1]
    db = gnd["imlist"][int(np.ravel(gnd["gnd"][-1]["easy"])[0])]
    xy = np.array([[10.0, 20.0], [100.0, 50.0], [200.0, 250.0]])
    mapped = apply_homography(homography_between(transforms, query, db), xy)
    errors = demo.gt_reprojection_errors(transforms, query, db, xy, mapped)
    np.testing.assert_allclose(errors, 0.0, atol=1e-9)


def test_rerun_skips_finished_stages_and_reproduces(demo_run, capsys):
    config, results = demo_run
    paths = demo.dataset_paths(config)
    gnd = load_gnd(paths.gnd, require_bbx=False)
    before, _ = load_store_features(config.features_dir / "database" / "features.h5",
                                    gnd["imlist"])
    again = json.loads(demo.main(config).read_text())
    out = capsys.readouterr().out
    assert "train: already trained" in out
    assert "is up to date, skipped" in out
    assert out.count(" 0 extracted") == 2
    after, _ = load_store_features(config.features_dir / "database" / "features.h5",
                                   gnd["imlist"])
    np.testing.assert_array_equal(before, after)
    for row in ("global", "reranked"):
        assert again[row] == results[row]
