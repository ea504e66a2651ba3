"""Revisitop gnd reader, restricted unpickler, ranks/scores scoring and the CLI."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from delg_tf.data import revisitop as data_rv
from delg_tf.evaluation import ranks as rk


def _small_gnd(num_db=8):
    return {
        "imlist": [f"db_{i}" for i in range(num_db)],
        "qimlist": ["q_0", "q_1"],
        "gnd": [
            {"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [1.0, 2.0, 30.0, 40.0]},
            {
                "easy": np.array([4]),
                "hard": np.array([], dtype=np.int64),
                "junk": np.array([5]),
                "bbx": np.array([0.0, 0.0, 10.0, 10.0]),
            },
        ],
    }


def test_restricted_unpickler_loads_numpy_and_containers(tmp_path):
    for protocol in (2, 4, 5):
        path = tmp_path / f"gnd_{protocol}.pkl"
        path.write_bytes(pickle.dumps(_small_gnd(), protocol=protocol))
        cfg = data_rv.load_gnd(path)
        assert cfg["qimlist"] == ["q_0", "q_1"]
        np.testing.assert_array_equal(cfg["gnd"][0]["easy"], [0, 1])
        np.testing.assert_array_equal(cfg["gnd"][1]["bbx"], [0, 0, 10, 10])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_os_system(tmp_path, monkeypatch):
    path = tmp_path / "gnd_roxford5k.pkl"
    # Only the bytes are produced here; __reduce__ is never executed by dumps.
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
    calls = []
    import os

    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(data_rv.UnsafePickleError, match=r"gnd_roxford5k\.pkl.*(posix|os)\.system"):
        data_rv.load_gnd(path)
    assert calls == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("qimlist"), "missing key"),
        (lambda c: c["gnd"].pop(), "one per query"),
        (lambda c: c["gnd"][0].pop("hard"), "lacks key"),
        (lambda c: c["gnd"][0].update(easy=[99]), r"\[0, 8\)"),
        (lambda c: c["gnd"][0].update(bbx=[5, 5, 1, 1]), "x2 > x1"),
    ],
)
def test_gnd_structure_errors(tmp_path, mutate, message):
    cfg = _small_gnd()
    mutate(cfg)
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(cfg))
    with pytest.raises(data_rv.GndFormatError, match=message):
        data_rv.load_gnd(path)


def test_gnd_mat_variant(tmp_path):
    from scipy.io import savemat

    gnd = np.zeros((1, 2), dtype=[("easy", "O"), ("hard", "O"), ("junk", "O"), ("bbx", "O")])
    gnd[0, 0] = (
        np.array([[1, 2]]),
        np.array([[3]]),
        np.array([[4]]),
        np.array([[1.0, 2.0, 30.0, 40.0]]),
    )
    gnd[0, 1] = (
        np.array([[5]]),
        np.zeros((1, 0)),
        np.array([[6]]),
        np.array([[0.0, 0.0, 10.0, 10.0]]),
    )
    imlist = np.array([[np.array([f"db_{i}"]) for i in range(8)]], dtype=object)
    qimlist = np.array([[np.array(["q_0"]), np.array(["q_1"])]], dtype=object)
    path = tmp_path / "gnd_roxford5k.mat"
    savemat(path, {"gnd": gnd, "imlist": imlist, "qimlist": qimlist})
    cfg = data_rv.load_gnd(path)
    assert cfg["imlist"][3] == "db_3" and cfg["qimlist"] == ["q_0", "q_1"]
    np.testing.assert_array_equal(cfg["gnd"][0]["easy"], [0, 1])  # 1-based -> 0-based
    assert cfg["gnd"][1]["hard"].size == 0


def test_dataset_paths_and_query_crop(tmp_path):
    from PIL import Image

    (tmp_path / "jpg").mkdir()
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(_small_gnd()))
    Image.new("RGB", (50, 60)).save(tmp_path / "jpg" / "q_0.jpg")
    (tmp_path / "extra.txt").write_text("d/one\nd/two.jpg\n")
    ds = data_rv.RevisitopDataset.from_dir(tmp_path, distractor_list=tmp_path / "extra.txt")
    assert ds.name == "roxford5k" and ds.num_db == 10 and ds.num_queries == 2
    assert ds.image_path(9).name == "two.jpg"
    assert ds.load_query(0).size == (29, 38)  # bbx (1, 2, 30, 40)
    assert ds.load_query(0, crop=False).size == (50, 60)


def test_ranks_shape_mismatch_errors():
    gnd = data_rv.validate_gnd(_small_gnd())["gnd"]
    with pytest.raises(rk.RankingShapeError, match="transposed"):
        rk.score_ranking(gnd, 8, ranks=np.zeros((2, 8), dtype=int))
    with pytest.raises(rk.RankingShapeError, match=r"expected shape \[num_db=8"):
        rk.score_ranking(gnd, 8, ranks=np.zeros((7, 2), dtype=int))
    with pytest.raises(rk.RankingShapeError, match="more than once"):
        rk.score_ranking(gnd, 8, ranks=np.zeros((8, 2), dtype=int))
    with pytest.raises(rk.RankingShapeError, match=r"\[0, 8\)"):
        rk.score_ranking(gnd, 8, ranks=np.arange(1, 17).reshape(8, 2))
    with pytest.raises(rk.RankingShapeError, match="scores"):
        rk.score_ranking(gnd, 8, scores=np.zeros((8, 3)))


def test_scores_and_ranks_agree():
    gnd = data_rv.validate_gnd(_small_gnd())["gnd"]
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(8, 2))
    ranks = np.argsort(-scores, axis=0)
    assert rk.score_ranking(gnd, 8, scores=scores) == rk.score_ranking(gnd, 8, ranks=ranks)


def test_cli_ranks_and_scores(tmp_path):
    gnd_path = tmp_path / "gnd_roxford5k.pkl"
    gnd_path.write_bytes(pickle.dumps(_small_gnd()))
    ranks = np.tile(np.arange(8)[:, None], (1, 2))
    np.save(tmp_path / "ranks.npy", ranks)
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        "-m",
        "delg_tf.evaluate",
        f"--gnd_path={gnd_path}",
        f"--ranks_path={tmp_path / 'ranks.npy'}",
        f"--output_json={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    assert set(res) == {"easy", "medium", "hard"}
    # query 0 medium: positives 0,1,2 at top -> 100; query 1: junk 5 before? no,
    # ranking 0..7, positive 4, junk 5 after it; junk-free position 4.
    q1_ap = (0 + 1 / 5) / 2
    assert res["medium"]["mAP"] == pytest.approx((1.0 + q1_ap) / 2 * 100)
    # Bad shape: clear error, exit code 2, no traceback.
    np.save(tmp_path / "bad.npy", ranks[:, :1])
    bad = subprocess.run(
        cmd[:-2] + [f"--ranks_path={tmp_path / 'bad.npy'}", f"--output_json={out}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected shape" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_scores_and_missing_input(tmp_path):
    gnd_path = tmp_path / "gnd_rparis6k.pkl"
    gnd_path.write_bytes(pickle.dumps(_small_gnd()))
    scores = -np.tile(np.arange(8, dtype=np.float64)[:, None], (1, 2))  # db 0 most similar
    np.save(tmp_path / "scores.npy", scores)
    out = tmp_path / "out.json"
    base = [
        sys.executable,
        "-m",
        "delg_tf.evaluate",
        f"--gnd_path={gnd_path}",
        f"--output_json={out}",
    ]
    subprocess.run(
        base + [f"--scores_path={tmp_path / 'scores.npy'}"], check=True, capture_output=True
    )
    by_scores = json.loads(out.read_text())
    np.save(tmp_path / "ranks.npy", np.tile(np.arange(8)[:, None], (1, 2)))
    subprocess.run(
        base + [f"--ranks_path={tmp_path / 'ranks.npy'}"], check=True, capture_output=True
    )
    assert json.loads(out.read_text()) == by_scores
    missing = subprocess.run(base, capture_output=True, text=True)
    assert missing.returncode == 2 and "--ranks_path" in missing.stderr
    # A matching flag out of range: named as the flag, one line, exit code 2.
    bad = subprocess.run(
        base + [f"--ranks_path={tmp_path / 'ranks.npy'}", "--ransac_iterations=0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--ransac_iterations must be an integer >= 1; received 0." in bad.stderr
