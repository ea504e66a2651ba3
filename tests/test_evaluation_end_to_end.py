"""`python -m delg_tf.evaluate` end to end: embedded tiny data + a tiny exported DelgModel."""

import dataclasses
import json
import subprocess
import sys

import pytest

from delg_tf import evaluate, extract
from delg_tf.data.embedded import build_embedded_dataset
from delg_tf.evaluation.config import EvaluateConfig, EvaluatePaths
from delg_tf.evaluation.end_to_end import DatasetEvalConfig, evaluate_dataset
from delg_tf.extraction.store import FeatureStore
from delg_tf.matching.pair import MatchingConfig
from delg_tf.models import registry
from delg_tf.models.delg import DelgModelConfig
from delg_tf.extraction.config import ExportConfig
from delg_tf.serving.delg_export import export_saved_model

NUM_CLASSES = 4
# Random weights: a zero score threshold keeps local features for the plumbing.
EXPORT = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=30,
    max_image_size=96,
    warmup=False,
)
# Few RANSAC trials and a short shortlist keep the run at a few seconds.
FAST = EvaluateConfig(
    shortlist_size=5, matching=MatchingConfig(ransac_iterations=50), num_workers=1
)
PROTOCOL_KEYS = {"easy", "medium", "hard"}
METRIC_KEYS = {"mAP", "mP@1", "mP@5", "mP@10"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = build_embedded_dataset(root / "embedded", preset="tiny")
    model = registry.build_model(
        "delg",
        DelgModelConfig(
            num_classes=NUM_CLASSES,
            backbone="tiny",
            embedding_dim=32,
            local_dim=16,
            attention_hidden=16,
        ),
        load_imagenet=False,
    )
    export = export_saved_model(model, root / "export", EXPORT)
    return root, data, export


@pytest.fixture(scope="module")
def first_run(setup):
    root, data, export = setup
    config = DatasetEvalConfig(
        output_json=str(root / "out" / "results.json"),
        dataset_dir=str(data.root),
        model_path=str(export),
        evaluate=FAST,
        progress=False,
    )
    return config, evaluate_dataset(config)


def test_end_to_end_json_table_and_cache_reuse(setup, first_run, capsys, monkeypatch):
    root = setup[0]
    config, results = first_run
    saved = json.loads((root / "out" / "results.json").read_text())
    for row in ("global", "reranked"):
        assert set(saved[row]) == PROTOCOL_KEYS
        assert set(saved[row]["medium"]) == METRIC_KEYS
        assert 0.0 <= saved[row]["medium"]["mAP"] <= 100.0
    assert saved["dataset"]["name"] == "embedded"
    assert saved["failed_images"] == {"database": [], "queries": []}
    assert saved["features"]["reused_cache"] is False
    assert saved["ranking"]["truncated"] is False
    assert saved["ranking"]["rows"] == saved["dataset"]["num_db"]
    assert results["reranked"]["medium"]["mAP"] == saved["reranked"]["medium"]["mAP"]
    db_store = root / "out" / "cache" / "db" / "features.h5"
    queries = FeatureStore(root / "out" / "cache" / "queries" / "features.h5")
    assert len(queries) == saved["dataset"]["num_queries"]
    mtime = db_store.stat().st_mtime_ns

    # Rerun: everything comes from the cache, the model is never loaded.
    def no_model(_config):
        raise AssertionError("the rerun must not build an extractor")

    monkeypatch.setattr(extract, "make_extractor", no_model)
    capsys.readouterr()
    again = evaluate_dataset(config)
    printed = capsys.readouterr().out
    assert "global" in printed and "reranked" in printed and "medium mAP" in printed
    assert again["features"]["reused_cache"] is True
    assert db_store.stat().st_mtime_ns == mtime
    for row in ("global", "reranked"):
        assert again[row] == results[row]


def _self_retrieval_dataset(data, folder, shift=0):
    """The tiny database with every database image also a query (full-image bbx). Query i's
    only positive is database image (i + shift) % num_db: "easy" for even i, "hard" for odd i.
    Returns (folder, num_db)."""
    import pickle
    import shutil

    import numpy as np
    from PIL import Image

    source = pickle_load(data.retrieval_dir / "gnd_embedded.pkl")
    names = list(source["imlist"])
    shutil.copytree(data.retrieval_dir / "jpg", folder / "jpg")
    gnd, empty = [], np.zeros(0, np.int64)
    for index, name in enumerate(names):
        with Image.open(folder / "jpg" / f"{name}.jpg") as image:
            width, height = image.size
        positive = np.array([(index + shift) % len(names)], np.int64)
        easy, hard = (positive, empty) if index % 2 == 0 else (empty, positive)
        gnd.append(
            {
                "easy": easy,
                "hard": hard,
                "junk": empty,
                "bbx": [0.0, 0.0, float(width), float(height)],
            }
        )
    (folder / "gnd_embedded.pkl").write_bytes(
        pickle.dumps({"imlist": names, "qimlist": names, "gnd": gnd}, protocol=4)
    )
    return folder, len(names)


def test_queries_that_are_database_images_are_retrieved_first(setup, tmp_path):
    """Oracle: a query identical to a database image gets the same features, so it is ranked
    first by the global search and after re-ranking. With itself as the only positive, every
    protocol's mAP and mP@k is exactly 100 (Easy: the even queries, Hard: the odd ones); with
    another image as the only positive, mP@1 is exactly 0."""
    import numpy as np

    _, data, export = setup
    folder, num_db = _self_retrieval_dataset(data, tmp_path / "self")
    config = DatasetEvalConfig(
        output_json=str(tmp_path / "out" / "self.json"),
        dataset_dir=str(folder),
        model_path=str(export),
        evaluate=FAST,
        progress=False,
        verbose=False,
    )
    results = evaluate_dataset(config)
    assert results["dataset"]["num_db"] == results["dataset"]["num_queries"] == num_db > 2
    assert results["failed_images"] == {"database": [], "queries": []}
    assert results["features"]["reused_cache"] is False
    # The oracle's premise: every query has the features of its database image.
    db, queries = (FeatureStore(results["features"][key]) for key in ("db_store", "query_store"))
    for name in db.names:
        ours, theirs = queries.get(name), db.get(name)
        assert len(ours["descriptors"]) > 0
        np.testing.assert_array_equal(ours["global_descriptor"], theirs["global_descriptor"])
        np.testing.assert_array_equal(ours["descriptors"], theirs["descriptors"])
    for row in ("global", "reranked"):
        for protocol in PROTOCOL_KEYS:
            assert results[row][protocol] == {key: 100.0 for key in METRIC_KEYS}, (
                row,
                protocol,
                results[row][protocol],
            )

    # Control: the next database image as the only positive (features from the cache).
    shifted, _ = _self_retrieval_dataset(data, tmp_path / "shifted", shift=1)
    control = evaluate_dataset(
        dataclasses.replace(
            config, dataset_dir=str(shifted), output_json=str(tmp_path / "out" / "shifted.json")
        )
    )
    assert control["features"]["reused_cache"] is True
    for row in ("global", "reranked"):
        for protocol in PROTOCOL_KEYS:
            assert control[row][protocol]["mP@1"] == 0.0, (row, protocol, control[row])
            assert control[row][protocol]["mAP"] < 100.0


def test_cache_of_another_model_is_refused(setup, tmp_path):
    root, data, export = setup
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache_key.json").write_text(json.dumps({"model_path": "/elsewhere"}))
    paths = EvaluatePaths(
        dataset="embedded",
        dataset_dir=data.root,
        model_path=export,
        cache_dir=cache,
        output_json=tmp_path / "o.json",
    )
    with pytest.raises(ValueError, match="--cache_dir=.*another model"):
        evaluate.main(FAST, paths)


def test_cli_end_to_end_and_missing_model(setup, first_run, tmp_path):
    root, data, export = setup
    out = tmp_path / "cli.json"
    common = [
        sys.executable,
        "-m",
        "delg_tf.evaluate",
        f"--dataset_dir={data.root}",
        "--noprogress",
        "--shortlist_size=3",
        "--ransac_iterations=20",
        "--num_workers=1",
    ]
    # The features cached by the first run (same model) are reused.
    result = subprocess.run(
        common
        + [
            f"--model_path={export}",
            f"--output_json={out}",
            f"--cache_dir={root / 'out' / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reranked" in result.stdout
    saved = json.loads(out.read_text())
    assert set(saved["reranked"]) == PROTOCOL_KEYS and saved["features"]["reused_cache"]
    assert saved["config"]["shortlist_size"] == 3
    # No model and no demo export in the working directory: one line naming the flag.
    missing = subprocess.run(
        common + [f"--output_json={tmp_path / 'x.json'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert "--model_path is required" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    wrong = subprocess.run(
        common + [f"--model_path={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert wrong.returncode == 2 and "--model_path=" in wrong.stderr and "not found" in wrong.stderr


def test_query_crops_use_the_official_resize_factor(tmp_path):
    """Each crop reaches the extractor as an array with its own resize factor (no pixel
    digest, no crop file: a name like `../escape` writes nothing outside the output)."""
    import pickle

    import numpy as np
    from PIL import Image

    from delg_tf.data.revisitop import RevisitopDataset
    from delg_tf.evaluation import end_to_end

    root = tmp_path / "data"
    (root / "jpg").mkdir(parents=True)
    for name, value in (("q", 120), ("full", 60)):
        Image.fromarray(np.full((80, 100, 3), value, np.uint8)).save(root / "jpg" / f"{name}.jpg")
    Image.fromarray(np.full((80, 100, 3), 30, np.uint8)).save(root / "escape.jpg")
    crop_bbx, full_bbx = [10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 100.0, 80.0]
    gnd = {
        "imlist": ["q"],
        "qimlist": ["q", "full", "../escape"],
        "gnd": [
            {"easy": [0], "hard": [], "junk": [], "bbx": bbx}
            for bbx in (crop_bbx, full_bbx, crop_bbx)
        ],
    }
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
    dataset = RevisitopDataset.from_dir(root)
    items = end_to_end.query_items(dataset)
    assert [(name, factor) for name, _, factor in items] == [
        ("q", 0.5),
        ("full", None),
        ("../escape", 0.5),
    ]  # max(crop) / max(image) = 50 / 100
    assert items[1][1] == root / "jpg" / "full.jpg"  # whole-image bbx: the file as is
    with Image.open(root / "jpg" / "q.jpg") as image:
        expected = np.asarray(image.convert("RGB").crop((10, 10, 60, 50)))
    np.testing.assert_array_equal(items[0][1](), expected)

    calls = []

    def fake_extractor(image, **kwargs):
        calls.append((image.shape, kwargs))
        return {
            "image_shape": image.shape,
            "global_descriptor": np.ones(4, np.float32),
            "locations": np.zeros((0, 2)),
            "descriptors": np.zeros((0, 0)),
            "attention": np.zeros(0),
            "scales": np.zeros(0),
        }

    out = tmp_path / "out"
    config = extract.ExtractConfig(output_dir=str(out), model_path="unused", progress=False)
    store = FeatureStore(extract.main(config, items, extractor=fake_extractor))
    assert calls == [
        ((40, 50, 3), {"resize_factor": 0.5}),
        ((80, 100, 3), {}),
        ((40, 50, 3), {"resize_factor": 0.5}),
    ]
    assert store.names == ["q", "full", "../escape"]
    store.close()
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"data", "out"} and not list(tmp_path.rglob("*.png"))


def test_unreadable_image_is_listed_and_stale_cache_replaced(setup, tmp_path):
    import shutil

    _, data, export = setup
    retrieval = tmp_path / "retrieval"
    shutil.copytree(data.retrieval_dir, retrieval)
    gnd = pickle_load(retrieval / "gnd_embedded.pkl")
    broken = gnd["imlist"][-1]
    (retrieval / "jpg" / f"{broken}.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache_key.json").write_text(json.dumps({"model_path": "/an/old/model"}))
    (cache / "keep.txt").write_text("user file")
    config = DatasetEvalConfig(
        output_json=str(tmp_path / "r.json"),
        dataset_dir=str(retrieval),
        model_path=str(export),
        cache_dir=str(cache),
        evaluate=FAST,
        progress=False,
        verbose=False,
        replace_stale_cache=True,
    )
    results = evaluate_dataset(config)
    assert results["failed_images"] == {"database": [broken], "queries": []}
    assert set(results["reranked"]) == PROTOCOL_KEYS
    assert (cache / "keep.txt").is_file()
    assert json.loads((cache / "cache_key.json").read_text())["model_path"] == str(export)
    errors = (cache / "db" / "errors.tsv").read_text()
    assert broken in errors


def pickle_load(path):
    from delg_tf.data.revisitop import load_pickle_restricted

    return load_pickle_restricted(path)
