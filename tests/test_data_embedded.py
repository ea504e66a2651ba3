"""Tests of the embedded default dataset (delg_tf.data.embedded)."""

import csv
import filecmp
import json

import numpy as np
import pytest
from PIL import Image

from delg_tf.data import embedded, embedded_render, homography
from delg_tf.data.errors import DataError

SHIFT_PX = 6.0
NUM_WARP_TRIALS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded") / "tiny"
    return embedded.build_embedded_dataset(root, preset="tiny")


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float64)


def test_layout_and_counts(tiny):
    params = embedded.PRESETS["tiny"]
    with open(tiny.train_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "url", "landmark_id"]
    assert len(rows) == params["num_landmarks"] * params["num_train_views"]
    assert {int(r["landmark_id"]) for r in rows} == set(range(params["num_landmarks"]))
    for row in rows:
        assert (tiny.train_images_dir / f"{row['id']}.jpg").is_file()
    gnd = embedded.load_ground_truth(tiny)
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    assert len(gnd["qimlist"]) == params["num_landmarks"]
    assert len(gnd["gnd"]) == len(gnd["qimlist"])
    for name in gnd["imlist"] + gnd["qimlist"]:
        assert (tiny.jpg_dir / f"{name}.jpg").is_file()
    meta = embedded.load_transforms(tiny)
    assert set(meta["images"]) == {r["id"] for r in rows} | set(gnd["imlist"]) | set(gnd["qimlist"])


def test_ground_truth_lists(tiny):
    gnd = embedded.load_ground_truth(tiny)
    meta = embedded.load_transforms(tiny)["images"]
    for query, entry in zip(gnd["qimlist"], gnd["gnd"]):
        q = meta[query]
        assert entry["bbx"].tolist() == [0, 0, q["width"], q["height"]]
        positives = np.concatenate([entry["easy"], entry["hard"]])
        assert len(positives) >= 1
        for key in ("easy", "hard", "junk"):
            assert entry[key].dtype == np.int64
            for index in entry[key]:
                assert meta[gnd["imlist"][index]]["landmark_id"] == q["landmark_id"]
        assert all(meta[gnd["imlist"][i]]["profile"] == "easy" for i in entry["easy"])
        # Every same-landmark database view is in exactly one list.
        same = [
            i for i, n in enumerate(gnd["imlist"]) if meta[n]["landmark_id"] == q["landmark_id"]
        ]
        listed = np.concatenate([positives, entry["junk"]])
        assert sorted(listed.tolist()) == same


def test_deterministic_and_idempotent(tiny, tmp_path):
    again = embedded.build_embedded_dataset(tmp_path / "again", preset="tiny")
    names = sorted(p.name for p in tiny.jpg_dir.iterdir())
    assert names == sorted(p.name for p in again.jpg_dir.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tiny.jpg_dir, again.jpg_dir, names, shallow=False)
    assert not mismatch and not errors
    assert filecmp.cmp(tiny.transforms, again.transforms, shallow=False)
    assert filecmp.cmp(tiny.train_csv, again.train_csv, shallow=False)
    stamp = again.manifest.stat().st_mtime_ns
    embedded.build_embedded_dataset(tmp_path / "again", preset="tiny")
    assert again.manifest.stat().st_mtime_ns == stamp
    other = embedded.build_embedded_dataset(
        tmp_path / "seed1", preset="tiny", seed=1, num_train_views=1
    )
    assert not filecmp.cmp(tiny.jpg_dir / names[0], other.jpg_dir / names[0], shallow=False)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_parameter_mismatch_and_foreign_folder(tiny, tmp_path):
    with pytest.raises(DataError, match="other parameters"):
        embedded.build_embedded_dataset(tiny.root, preset="tiny", seed=7)
    (tmp_path / "foreign").mkdir()
    with pytest.raises(DataError, match="not a complete embedded dataset"):
        embedded.build_embedded_dataset(tmp_path / "foreign", preset="tiny")
    with pytest.raises(TypeError):
        embedded._resolve_params("tiny", {"bogus": 1})


def test_homography_from_points_exact():
    rng = np.random.default_rng(0)
    src = np.array([[0, 0], [100, 0], [100, 80], [0, 80]], float)
    dst = src + rng.uniform(-15, 15, src.shape)
    h = homography.homography_from_points(src, dst)
    np.testing.assert_allclose(homography.apply_homography(h, src), dst, atol=1e-9)
    shifted = homography.shift_homography_convention(h, 0.5)
    np.testing.assert_allclose(
        homography.apply_homography(shifted, src + 0.5), dst + 0.5, atol=1e-9
    )


def test_warp_moves_a_dot_where_the_homography_says():
    """By construction: a white dot on black lands at H @ dot in the view."""
    rng = np.random.default_rng(3)
    source = np.zeros((200, 300, 3), np.uint8)
    dot = np.array([170.0, 90.0])
    source[88:93, 168:173] = 255
    checked = 0
    for _ in range(NUM_WARP_TRIALS):
        geometry = homography.sample_view_geometry(
            rng, embedded.PROFILES["hard"], source.shape[:2], 160
        )
        quad_ok = geometry["quad"]
        assert quad_ok.min() >= 0 and quad_ok[:, 0].max() <= 299
        view = embedded_render.warp_view(source, geometry["homography"], geometry["output_size"])
        expected = homography.apply_homography(geometry["homography"], dot)[0]
        w, h = geometry["output_size"]
        if not (3 <= expected[0] < w - 3 and 3 <= expected[1] < h - 3):
            continue
        gray = view.mean(axis=-1)
        ys, xs = np.nonzero(gray > 0.5 * gray.max())
        weights = gray[ys, xs]
        found = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
        np.testing.assert_allclose(found, expected, atol=1.0)
        checked += 1
    # With seed 3 the dot lands inside every sampled view: all trials are checked.
    assert checked == NUM_WARP_TRIALS


def _normalized_correlation(a, b, mask):
    a, b = a[mask], b[mask]
    a = (a - a.mean()) / (a.std() + 1e-9)
    b = (b - b.mean()) / (b.std() + 1e-9)
    return float(np.mean(a * b))


def test_recorded_homographies_match_the_written_images(tiny):
    """Warping the source / another view with the recorded H reproduces a view
    (up to lighting): high normalised correlation on the overlap."""
    from skimage.transform import ProjectiveTransform, warp

    meta = embedded.load_transforms(tiny)
    gnd = embedded.load_ground_truth(tiny)
    query = gnd["qimlist"][0]
    photo = meta["images"][query]["photo"]
    source = _read(tiny.sources_dir / f"{photo}.jpg").mean(axis=-1)
    views = [n for n in gnd["imlist"] if meta["images"][n]["photo"] == photo]
    params = embedded.PRESETS["tiny"]
    assert len(views) == params["num_easy"] + params["num_hard"] + params["num_junk"]
    shift_checked = 0
    for name in views:
        target = _read(tiny.jpg_dir / f"{name}.jpg").mean(axis=-1)
        h = homography.homography_to_view(meta, name)
        rendered = warp(
            source, ProjectiveTransform(matrix=np.linalg.inv(h)), output_shape=target.shape, order=1
        )
        assert _normalized_correlation(rendered, target, np.ones(target.shape, bool)) > 0.8
        # Between two views: query -> database view, versus the same
        # homography shifted by a few pixels (must correlate clearly worse).
        if meta["images"][name]["profile"] == "junk":
            continue
        q_image = _read(tiny.jpg_dir / f"{query}.jpg").mean(axis=-1)
        h_qd = homography.homography_between(meta, query, name)
        scores = []
        for shift in (0.0, SHIFT_PX):
            h = np.array([[1, 0, shift], [0, 1, 0], [0, 0, 1.0]]) @ h_qd
            moved = warp(
                q_image,
                ProjectiveTransform(matrix=np.linalg.inv(h)),
                output_shape=target.shape,
                order=1,
                cval=-1.0,
            )
            overlap = moved >= 0
            assert overlap.mean() > 0.2, name
            scores.append(_normalized_correlation(moved, target, overlap))
        assert scores[0] > 0.8 and scores[0] > scores[1] + 0.2, (name, scores)
        shift_checked += 1
    # The shift check ran on every easy and hard view (junk views are skipped).
    assert shift_checked == params["num_easy"] + params["num_hard"]
    wrong = homography.homography_between(meta, query, views[0])
    assert not np.allclose(wrong, np.eye(3))
    with pytest.raises(ValueError, match="different photos"):
        other = next(n for n in gnd["imlist"] if meta["images"][n]["photo"] != photo)
        homography.homography_between(meta, query, other)


def test_homography_between_composes():
    meta = {
        "images": {
            n: {"photo": "p", "homography_source_to_view": h.tolist()}
            for n, h in [
                ("a", np.diag([2.0, 2.0, 1.0])),
                ("b", np.array([[1, 0, 5], [0, 1, -3], [0, 0, 1.0]])),
            ]
        }
    }
    h = homography.homography_between(meta, "a", "b")
    np.testing.assert_allclose(homography.apply_homography(h, [[10.0, 20.0]]), [[10.0, 7.0]])


def test_manifest_written(tiny):
    manifest = json.loads(tiny.manifest.read_text())
    assert manifest["params"] == embedded.PRESETS["tiny"]
    assert manifest["counts"]["query"] == embedded.PRESETS["tiny"]["num_landmarks"]


def test_default_root_depends_on_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.ROOT_ENV_VAR, str(tmp_path))
    tiny_root = embedded.default_root("tiny")
    assert tiny_root.parent == tmp_path
    assert tiny_root == embedded.default_root("tiny", seed=0)
    assert tiny_root != embedded.default_root("tiny", seed=1)
    assert tiny_root != embedded.default_root("default")


def test_ground_truth_loads_with_the_evaluation_reader(tiny):
    from delg_tf.data.revisitop import load_gnd

    gnd = load_gnd(tiny.gnd)
    assert len(gnd["gnd"]) == len(gnd["qimlist"])


def test_stale_partial_build_is_removed(tmp_path):
    import socket

    root = tmp_path / "ds"
    dead_pid = 2**22 + 12345  # above the default pid_max: never alive
    stale = tmp_path / f"ds.tmp-{socket.gethostname()}-{dead_pid}"
    (stale / "train").mkdir(parents=True)
    embedded.build_embedded_dataset(root, preset="tiny", num_train_views=1)
    assert not stale.exists() and root.is_dir()
