"""Global index on disk (`delg_tf.retrieval.index`, `python -m delg_tf.index`): every method
built from a sharded store opened by glob, against the brute-force oracle
(`search.exact_search`); save / load round trip; refused folders; the CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from delg_tf.configs import ConfigError
from delg_tf.extraction.store import FeatureStore, FeatureStoreWriter, consolidate
from delg_tf.retrieval import index as ix
from delg_tf.retrieval import search

import faiss  # noqa: E402 - in .[all] (the faiss extra)

NUM_IMAGES = 2000
DIM = 32
CLUSTERS = 20
NOISE = 0.5
NUM_QUERIES = 50
NUM_SHARDS = 3
K = 10
# recall@10 against exact search measured on this data (2 CPU cores): ivf_flat nprobe=1
# of 16 cells 0.97, ivf_pq (32 codes of 4 bits) 0.70, hnsw (M=8, ef_search=10) 0.91;
# the bounds leave room for the thread-order dependence of HNSW construction.
APPROXIMATE = {
    "ivf_flat": (ix.IndexParams("ivf_flat", nlist=16, nprobe=1), 0.9),
    "ivf_pq": (ix.IndexParams("ivf_pq", nlist=8, nprobe=2, pq_m=32, pq_nbits=4), 0.6),
    "hnsw": (ix.IndexParams("hnsw", hnsw_m=8, ef_search=10), 0.8),
}
ALL_METHODS = dict(APPROXIMATE, flat=(ix.IndexParams("flat"), 1.0))
SCORE_TOLERANCE = 1e-5


def _name(i):
    return f"img_{i:05d}.jpg"


def _features(descriptor):
    return {
        "image_shape": (8, 8, 3),
        "global_descriptor": descriptor,
        "locations": np.zeros((0, 2)),
        "descriptors": np.zeros((0, 8)),
        "attention": np.zeros(0),
        "scales": np.zeros(0),
    }


def _write(parts, path, items):
    with FeatureStoreWriter(parts, flush_every=500) as writer:
        for name, descriptor in items:
            writer.add(name, _features(descriptor))
    return consolidate(parts, path, order=[n for n, _ in items])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Clustered descriptors in `NUM_SHARDS` shard files (and one single file)."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLUSTERS, DIM))

    def draw(n):
        return search.l2_normalize(
            centers[rng.integers(0, CLUSTERS, n)] + NOISE * rng.normal(size=(n, DIM))
        )

    database, queries = draw(NUM_IMAGES), draw(NUM_QUERIES)
    items = [(_name(i), database[i]) for i in range(NUM_IMAGES)]
    (root / "out").mkdir()
    for k in range(NUM_SHARDS):
        _write(
            root / f"s{k}.parts",
            root / "out" / f"features-{k:05d}-of-{NUM_SHARDS:05d}.h5",
            items[k::NUM_SHARDS],
        )
    single = _write(root / "single.parts", root / "features.h5", items)
    glob = str(root / "out" / f"features-*-of-{NUM_SHARDS:05d}.h5")
    with FeatureStore(glob) as store:
        stored = store.global_descriptors  # store order: shard 0, 1, 2
        names = list(store.names)
    return {
        "glob": glob,
        "single": single,
        "stored": stored,
        "names": names,
        "queries": queries,
        "root": root,
    }


def _exact(data, k=K):
    return search.exact_search(search.l2_normalize(data["queries"]), data["stored"], k)


def test_flat_is_exact_search_on_shards_by_glob(data):
    index = ix.build(data["glob"], ix.IndexParams("flat"), progress=False)
    assert index.names == data["names"] and index.size == NUM_IMAGES and index.dim == DIM
    ids, scores = index.search(data["queries"], K)
    exact_ids, exact_scores = _exact(data)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=SCORE_TOLERANCE)
    # IVF scanning every cell is exact too; the single-file store gives the same names.
    full = ix.build(data["single"], ix.IndexParams("ivf_flat", nlist=16, nprobe=16), progress=False)
    got, _ = full.search_names(data["queries"], K)
    assert got == [[data["names"][i] for i in row] for row in exact_ids]
    manifest = index.manifest
    assert manifest["count"] == NUM_IMAGES and manifest["dim"] == DIM
    assert [s["size"] for s in manifest["sources"]] == [
        os.path.getsize(p) for p in sorted(data["root"].glob("out/*.h5"))
    ]


@pytest.mark.parametrize("method", sorted(APPROXIMATE))
def test_approximate_methods_reach_their_measured_recall(data, method):
    params, bound = APPROXIMATE[method]
    index = ix.build(data["glob"], params, progress=False)
    ids, scores = index.search(data["queries"], K)
    assert ids.shape == (NUM_QUERIES, K) and scores.dtype == np.float32
    assert search.recall_at_k(ids, _exact(data)[0]) >= bound
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    if method != "flat":
        more = {"nprobe": 16} if method.startswith("ivf") else {"ef_search": 200}
        better, _ = index.set_search_params(**more).search(data["queries"], K)
        assert search.recall_at_k(better, _exact(data)[0]) >= search.recall_at_k(
            ids, _exact(data)[0]
        )


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_save_load_round_trip_gives_identical_results(data, tmp_path, method):
    built = ix.build(data["glob"], ALL_METHODS[method][0], progress=False)
    before = built.search(data["queries"], K)
    path = built.save(tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder
    loaded = ix.load_index(path, dim=DIM)
    after = loaded.search(data["queries"], K)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.names == data["names"] and loaded.method == method
    manifest = json.loads((path / ix.MANIFEST_FILE).read_text())
    assert manifest["faiss_version"] == faiss.__version__
    assert manifest["files"][ix.INDEX_FILE] == (path / ix.INDEX_FILE).stat().st_size
    if method == "ivf_flat":
        assert ix.load_index(path, nprobe=3).index.nprobe == 3


def test_load_refuses_mismatched_or_incomplete_indexes(data, tmp_path):
    path = ix.build_index(data["glob"], tmp_path / "index", ix.IndexParams("flat"), progress=False)
    with pytest.raises(ix.IndexLoadError, match=f"dimension {DIM}, the queries.* have 64"):
        ix.load_index(path, dim=64)
    with pytest.raises(search.SearchError, match=f"dimension {DIM}"):
        ix.load_index(path).search(np.ones((2, 64), np.float32), K)
    with pytest.raises(ix.IndexLoadError, match="does not exist"):
        ix.load_index(tmp_path / "absent")
    # A store file changed after the build: refused unless check_sources=False.
    source = sorted(data["root"].glob("out/*.h5"))[1]
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ix.IndexLoadError, match=f"built from {source}.*rebuild"):
            ix.load_index(path)
        assert ix.load_index(path, check_sources=False).size == NUM_IMAGES
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    manifest_path = path / ix.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, dim=DIM + 1)))
    with pytest.raises(ix.IndexLoadError, match=f"dimension {DIM + 1}, the files hold"):
        ix.load_index(path)
    manifest_path.write_text(json.dumps(manifest))
    (path / ix.NAMES_FILE).unlink()
    with pytest.raises(ix.IndexLoadError, match=f"{ix.NAMES_FILE} is missing.*rebuild"):
        ix.load_index(path)
    manifest_path.unlink()
    with pytest.raises(ix.IndexLoadError, match="no manifest.json"):
        ix.load_index(path)


def test_existing_folders_and_a_crash_while_writing(data, tmp_path, monkeypatch):
    params = ix.IndexParams("flat")
    path = ix.build_index(data["glob"], tmp_path / "index", params, progress=False)
    with pytest.raises(ix.IndexExistsError, match="--overwrite"):
        ix.build_index(data["glob"], path, params, progress=False)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ix.IndexExistsError, match="not an index"):
        ix.build_index(data["glob"], other, params, overwrite=True, progress=False)
    reference = ix.load_index(path).search(data["queries"], K)
    # A failure while writing the replacement leaves the old index, no temporary folder.
    monkeypatch.setattr(
        faiss, "write_index", lambda *a: (_ for _ in ()).throw(RuntimeError("disk exploded"))
    )
    with pytest.raises(ix.IndexOutputError, match="cannot write.*faiss: disk exploded"):
        ix.build_index(data["glob"], path, ix.IndexParams("hnsw"), overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "photos"]
    loaded = ix.load_index(path)
    assert loaded.method == "flat"
    np.testing.assert_array_equal(loaded.search(data["queries"], K)[0], reference[0])


def test_aligned_view_uses_dataset_positions(data):
    """Evaluation ids are positions in the dataset list (names without extension, another
    order, a subset): indexed images outside the list are dropped from the results."""
    index = ix.build(data["glob"], ix.IndexParams("flat"), progress=False)
    rng = np.random.default_rng(1)
    subset = rng.permutation(NUM_IMAGES)[: NUM_IMAGES // 2]  # positions in the store
    db_names = [data["names"][i][: -len(".jpg")] for i in subset]
    view = index.aligned(db_names)
    assert view.size == len(db_names)
    ids, scores = view.search(data["queries"], K)
    exact_ids, exact_scores = search.exact_search(
        search.l2_normalize(data["queries"]), data["stored"][subset], K
    )
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=SCORE_TOLERANCE)
    with pytest.raises(ix.IndexLoadError, match="1 image.*not in the index.*'absent'"):
        index.aligned(db_names + ["absent"])
    with pytest.raises(ix.IndexLoadError, match="same indexed image"):
        index.aligned(db_names + [data["names"][subset[0]]])


def test_parameters_are_validated_with_the_flag_named():
    with pytest.raises(ConfigError, match="^--method must be one of flat, ivf_flat, ivf_pq"):
        ix.IndexParams("ivf")
    with pytest.raises(ConfigError, match="^--nprobe must be an integer >= 1; received 0"):
        ix.IndexParams("ivf_flat", nprobe=0)
    with pytest.raises(ConfigError, match="^--nlist must be .* leave it unset"):
        ix.IndexParams("ivf_flat", nlist=0)
    with pytest.raises(ConfigError, match="does not divide the descriptor dimension"):
        ix.IndexParams("ivf_pq", pq_m=5).resolve(NUM_IMAGES, DIM)
    with pytest.raises(ConfigError, match="--train_size"):
        ix.IndexParams("ivf_flat", nlist=64, train_size=10).resolve(NUM_IMAGES, DIM)
    # Defaults for ~1M descriptors of the real model.
    resolved = ix.IndexParams("ivf_pq").resolve(10**6, 2048)
    assert resolved == {
        "nlist": 4000,
        "nprobe": ix.DEFAULT_NPROBE,
        "pq_m": 64,
        "pq_nbits": 8,
        "train_size": 200000,
    }
    assert ix.default_pq_m(64) == 16 and ix.default_pq_m(96) == 24


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "delg_tf.index", *args], capture_output=True, text=True
    )


def test_cli_end_to_end_and_one_line_errors(data, tmp_path):
    out = tmp_path / "index"
    done = _cli(
        f"--features={data['glob']}",
        f"--index_dir={out}",
        "--method=ivf_flat",
        "--nlist=16",
        "--nprobe=16",
        "--noprogress",
    )
    assert done.returncode == 0, done.stderr
    assert f"index: ivf_flat (nlist=16, nprobe=16) of {NUM_IMAGES} descriptors" in done.stdout
    ids, _ = ix.load_index(out).search(data["queries"], K)
    np.testing.assert_array_equal(ids, _exact(data)[0])
    (tmp_path / "partial").mkdir()  # shards 0 and 2 of 3
    for path in sorted(data["root"].glob("out/*.h5"))[::2]:
        shutil.copy(path, tmp_path / "partial" / path.name)
    partial = tmp_path / "partial" / f"features-*-of-{NUM_SHARDS:05d}.h5"
    failures = {
        "--method": ["--method=ivf", f"--features={data['glob']}", f"--index_dir={out}2"],
        "--nprobe": ["--nprobe=0", f"--features={data['glob']}", f"--index_dir={out}2"],
        "does not exist": [f"--features={tmp_path / 'absent.h5'}", f"--index_dir={out}2"],
        "misses 1 shard": [f"--features={partial}", f"--index_dir={out}2"],
        "--overwrite": [f"--features={data['glob']}", f"--index_dir={out}"],
        "--features is required": [f"--index_dir={out}2"],
    }
    for expected, args in failures.items():
        failed = _cli(*args)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 2 and len(lines) == 1, (expected, failed.stderr)
        assert lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "index2").exists()
