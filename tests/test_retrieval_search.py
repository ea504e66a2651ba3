"""Global search: chunked exact vs brute force, faiss exact and approximate."""

import numpy as np
import pytest

from delg_tf.retrieval import search

NUM_DB, NUM_Q, DIM = 3000, 20, 64


def _clustered(rng, n, centers):
    x = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, centers.shape[1]))
    return search.l2_normalize(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, DIM))
    return _clustered(rng, NUM_DB, centers), _clustered(rng, NUM_Q, centers)


def test_exact_chunked_equals_brute_force(data):
    db, q = data
    ids, scores = search.exact_search(q, db, k=100, chunk_size=257)
    brute = q @ db.T
    ref_ids = np.argsort(-brute, axis=1, kind="stable")[:, :100]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ref_ids, axis=1), rtol=1e-5)


def test_k_larger_than_database_and_dim_mismatch(data):
    db, q = data
    ids, _ = search.exact_search(q, db[:7], k=100)
    assert ids.shape == (NUM_Q, 7)
    with pytest.raises(search.SearchError, match="queries 32 vs database 64"):
        search.exact_search(q[:, :32], db)


def test_full_ranking_layout(data):
    db, q = data
    ranks, scores = search.full_ranking(q, db[:50])
    assert ranks.shape == (50, NUM_Q) and scores.shape == (50, NUM_Q)
    assert np.all(np.diff(scores[ranks[:, 0], 0]) <= 0)


def test_faiss_flat_equals_exact(data):
    import faiss  # noqa: F401 - in .[all]

    db, q = data
    exact_ids, exact_scores = search.GlobalIndex("exact").build(db).search(q, 100)
    ids, scores = search.GlobalIndex("faiss_flat").build(db).search(q, 100)
    assert search.recall_at_k(ids, exact_ids) == 1.0
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


@pytest.mark.parametrize("method, min_recall", [("faiss_hnsw", 0.9), ("faiss_ivf", 0.9)])
def test_faiss_approximate_recall_at_100(data, method, min_recall):
    import faiss  # noqa: F401 - in .[all]

    db, q = data
    exact_ids, _ = search.exact_search(q, db, 100)
    ids, _ = search.GlobalIndex(method).build(db).search(q, 100)
    assert search.recall_at_k(ids, exact_ids) >= min_recall


def test_unknown_method_and_empty_index():
    with pytest.raises(search.SearchError, match="unknown search method"):
        search.GlobalIndex("annoy")
    with pytest.raises(search.SearchError, match="build"):
        search.GlobalIndex().search(np.zeros((1, 4)))


def test_missing_faiss_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"delg_tf\[faiss\]"):
        search.GlobalIndex("faiss_hnsw")
