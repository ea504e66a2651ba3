"""`evaluate --index_dir`: the global search of an evaluation from an index folder on disk.

Oracles: numpy brute-force top-k (`search.exact_search` is itself checked against
numpy elsewhere; here the ranks are recomputed with a plain argsort) scored with the
revisitop metric, and the same evaluation without an index.
"""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from delg_tf import evaluate
from delg_tf.configs import ConfigError
from delg_tf.evaluation.config import EvaluateConfig, EvaluatePaths
from delg_tf.evaluation.end_to_end import DatasetEvalConfig, evaluate_dataset
from delg_tf.evaluation.revisitop import evaluate_revisitop
from delg_tf.extraction.store import FeatureStoreWriter, consolidate
from delg_tf.retrieval import index as ix

pytest.importorskip("faiss")

NUM_DB = 300
NUM_QUERIES = 12
DIM = 16
CLUSTERS = 6
TOP_K = 40
KAPPAS = (1, 5, 10)
SHORTLIST = 10  # <= TOP_K (RANSAC is off in these tests)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_store(folder, names, descriptors, order=None):
    """A store of `names` (+ ".jpg"), rows in `order` (a permutation; default as given)."""
    with FeatureStoreWriter(folder.with_suffix(".parts")) as writer:
        for name, g in zip(names, descriptors):
            writer.add(
                name + ".jpg",
                {
                    "image_shape": (240, 320, 3),
                    "global_descriptor": g,
                    "locations": np.zeros((0, 2)),
                    "descriptors": np.zeros((0, 8)),
                    "attention": np.zeros(0),
                    "scales": np.zeros(0),
                },
            )
    order = range(len(names)) if order is None else order
    return consolidate(
        folder.with_suffix(".parts"),
        folder.with_suffix(".h5"),
        order=[names[i] + ".jpg" for i in order],
    )


def _oracle_ranks(db, queries, k):
    """Top-k database ids per query by cosine, ties by id: [k, Q] (revisitop layout)."""
    sims = _unit(queries) @ _unit(db).T
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), sims.shape), -sims), axis=1)
    return order[:, :k].T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_eval")
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(CLUSTERS, DIM))
    labels = rng.integers(0, CLUSTERS, NUM_DB)
    db = _unit(centers[labels] + 0.6 * rng.normal(size=(NUM_DB, DIM))).astype(np.float32)
    q_labels = np.arange(NUM_QUERIES) % CLUSTERS
    queries = _unit(centers[q_labels] + 0.6 * rng.normal(size=(NUM_QUERIES, DIM)))
    queries = queries.astype(np.float32)
    imlist = [f"db_{i:04d}" for i in range(NUM_DB)]
    qimlist = [f"q_{i:03d}" for i in range(NUM_QUERIES)]
    gnd = []
    for label in q_labels:
        same = np.flatnonzero(labels == label)
        gnd.append({"easy": same[::2], "hard": same[1::2], "junk": np.zeros(0, np.int64)})
    # The database store (hence the index) holds the images in another order than
    # imlist: the evaluation must map index ids to dataset positions.
    db_store = _write_store(root / "db", imlist, db, order=rng.permutation(NUM_DB))
    q_store = _write_store(root / "q", qimlist, queries)
    gnd_path = root / "gnd_roxford5k.pkl"
    gnd_path.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    index_dir = root / "index_flat"
    ix.build(db_store, ix.IndexParams("flat"), progress=False).save(index_dir)
    return {
        "root": root,
        "db": db,
        "queries": queries,
        "gnd": gnd,
        "gnd_path": gnd_path,
        "db_store": db_store,
        "q_store": q_store,
        "index_dir": index_dir,
        "imlist": imlist,
        "qimlist": qimlist,
    }


def _paths(data, out):
    return EvaluatePaths(
        gnd_path=data["gnd_path"],
        output_json=out,
        db_features=data["db_store"],
        query_features=data["q_store"],
    )


def test_index_search_equals_brute_force_top_k(data, tmp_path):
    config = EvaluateConfig(
        rerank="none",
        top_k=TOP_K,
        kappas=KAPPAS,
        shortlist_size=SHORTLIST,
        index_dir=str(data["index_dir"]),
    )
    saved = json.loads(evaluate.main(config, _paths(data, tmp_path / "index.json")).read_text())
    expected = evaluate_revisitop(
        _oracle_ranks(data["db"], data["queries"], TOP_K), data["gnd"], KAPPAS
    )
    assert saved["global"] == expected
    assert saved["config"]["index_dir"] == str(data["index_dir"])
    # Without the index (exact top-k from the descriptors): the same numbers.
    plain = EvaluateConfig(rerank="none", top_k=TOP_K, kappas=KAPPAS, shortlist_size=SHORTLIST)
    no_index = json.loads(evaluate.main(plain, _paths(data, tmp_path / "plain.json")).read_text())
    assert no_index["global"] == saved["global"]


def test_alpha_qe_and_superglobal_search_the_index_too(data, tmp_path):
    common = dict(rerank="superglobal", query_expansion="aqe", top_k=TOP_K, superglobal_m=TOP_K)
    common.update(kappas=KAPPAS, shortlist_size=SHORTLIST)
    with_index = EvaluateConfig(**common, index_dir=str(data["index_dir"]))
    got = json.loads(evaluate.main(with_index, _paths(data, tmp_path / "a.json")).read_text())
    want = json.loads(
        evaluate.main(EvaluateConfig(**common), _paths(data, tmp_path / "b.json")).read_text()
    )
    for key in ("global", "expanded", "reranked"):
        assert got[key] == want[key], key
    # End to end on stores (the embedded-dataset layout), same numbers.
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    boxed = [{**g, "bbx": np.array([0.0, 0.0, 320.0, 240.0])} for g in data["gnd"]]
    (embedded / "gnd_embedded.pkl").write_bytes(
        pickle.dumps({"imlist": data["imlist"], "qimlist": data["qimlist"], "gnd": boxed})
    )
    results = evaluate_dataset(
        DatasetEvalConfig(
            output_json=str(tmp_path / "e2e.json"),
            dataset_dir=str(embedded),
            db_features=str(data["db_store"]),
            query_features=str(data["q_store"]),
            evaluate=with_index,
            progress=False,
            verbose=False,
        )
    )
    assert results["reranked"] == got["reranked"]


def test_index_flags_are_validated():
    with pytest.raises(ConfigError, match="^--top_k must be an integer > 0 with --index_dir"):
        EvaluateConfig(rerank="none", shortlist_size=0, index_dir="idx")
    with pytest.raises(ConfigError, match="^--dba must be 0 with --index_dir"):
        EvaluateConfig(rerank="none", shortlist_size=0, top_k=10, dba=3, index_dir="idx")


def _cli(data, out, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "delg_tf.evaluate",
            f"--gnd_path={data['gnd_path']}",
            f"--db_features={data['db_store']}",
            f"--query_features={data['q_store']}",
            f"--output_json={out}",
            "--rerank=none",
            f"--shortlist_size={SHORTLIST}",
            *args,
        ],
        capture_output=True,
        text=True,
    )


def test_cli_uses_the_index_and_refuses_a_wrong_one_in_one_line(data, tmp_path):
    done = _cli(data, tmp_path / "ok.json", f"--index_dir={data['index_dir']}", f"--top_k={TOP_K}")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ok.json").read_text())["global"] == evaluate_revisitop(
        _oracle_ranks(data["db"], data["queries"], TOP_K), data["gnd"], (1, 5, 10)
    )
    # An index of another database (half the images) and of another dimension.
    half = tmp_path / "half"
    _write_store(half, data["imlist"][: NUM_DB // 2], data["db"][: NUM_DB // 2])
    ix.build(half.with_suffix(".h5"), ix.IndexParams("flat"), progress=False).save(
        tmp_path / "index_half"
    )
    other_dim = tmp_path / "dim8"
    _write_store(other_dim, data["imlist"], _unit(data["db"][:, :8]))
    ix.build(other_dim.with_suffix(".h5"), ix.IndexParams("flat"), progress=False).save(
        tmp_path / "index_dim8"
    )
    failures = {
        "150 image(s) of the database list (300 images) are not in index": [
            f"--index_dir={tmp_path / 'index_half'}",
            "--top_k=10",
        ],
        "dimension 8": [f"--index_dir={tmp_path / 'index_dim8'}", "--top_k=10"],
        "does not exist": [f"--index_dir={tmp_path / 'absent'}", "--top_k=10"],
        "--top_k must be an integer > 0": [f"--index_dir={data['index_dir']}"],
    }
    for expected, args in failures.items():
        failed = _cli(data, tmp_path / "bad.json", *args)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 2 and len(lines) == 1, (expected, failed.stderr)
        assert expected in lines[0], (expected, lines)
    assert not (tmp_path / "bad.json").exists()
