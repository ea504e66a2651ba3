"""Diffusion: sparse graph + conjugate gradient against loops and a dense closed-form solve."""

import numpy as np
import pytest

from delg_tf.retrieval import diffusion as df
from delg_tf.retrieval.search import SearchError, l2_normalize

NUM_DB, NUM_Q, DIM = 120, 5, 12


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(8, DIM))
    db = centers[rng.integers(0, 8, NUM_DB)] + 0.5 * rng.normal(size=(NUM_DB, DIM))
    q = centers[rng.integers(0, 8, NUM_Q)] + 0.5 * rng.normal(size=(NUM_Q, DIM))
    return l2_normalize(q), l2_normalize(db)


def dense_affinity(db, k, gamma):
    """knngraph.m with loops: kNN lists of the database against itself (self included)."""
    sims = db.astype(np.float64) @ db.T.astype(np.float64)
    n = len(db)
    knn = [sorted(range(n), key=lambda j: (-sims[i, j], j != i, j))[:k] for i in range(n)]
    a = np.zeros((n, n))
    for i in range(n):
        for j in knn[i]:
            if j != i and i in knn[j]:
                a[i, j] = max(sims[i, j], 0.0) ** gamma
    return a


def dense_scores(q, db, k, kq, gamma, alpha):
    """Closed form f = (I - alpha S)^-1 y with dense numpy."""
    a = dense_affinity(db, k, gamma)
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    s = inv[:, None] * a * inv[None, :]
    system = np.eye(len(db)) - alpha * s
    out = np.zeros((len(db), len(q)))
    for c in range(len(q)):
        sims = db.astype(np.float64) @ q[c].astype(np.float64)
        y = np.zeros(len(db))
        for j in sorted(range(len(db)), key=lambda j: (-sims[j], j))[:kq]:
            y[j] = max(sims[j], 0.0) ** gamma
        out[:, c] = np.linalg.solve(system, y)
    return out


def textbook_cg(a, b, tol, iterations):
    """Plain conjugate gradient from x = 0, stop at relative residual tol, last iterate."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    for _ in range(iterations):
        if np.linalg.norm(r) <= tol * np.linalg.norm(b):
            break
        ap = a @ p
        step = (r @ r) / (p @ ap)
        x += step * p
        r_new = r - step * ap
        p = r_new + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    return x


@pytest.mark.parametrize("k", [2, 8, 30])
def test_affinity_equals_loops(data, k):
    _, db = data
    a = df.knn_affinity(db, k, gamma=3.0)
    dense = a.toarray()
    np.testing.assert_allclose(dense, dense_affinity(db, k, 3.0), atol=1e-6)
    np.testing.assert_array_equal(dense, dense.T)
    assert np.all(np.diag(dense) == 0) and np.all((dense > 0).sum(axis=1) <= k - 1)


@pytest.mark.parametrize("k, kq, alpha", [(10, 5, 0.99), (25, 10, 0.9), (5, 3, 0.5)])
def test_cg_equals_dense_solve_of_the_same_system(data, k, kq, alpha):
    q, db = data
    system = df.diffusion_system(db, k, alpha=alpha)
    ids = np.argsort(-(db @ q.T), axis=0, kind="stable")[:kq]
    y = np.zeros((NUM_DB, NUM_Q))
    for c in range(NUM_Q):
        y[ids[:, c], c] = np.maximum((db[ids[:, c]] @ q[c]).astype(np.float64), 0) ** 3
    scores = np.stack([df.diffuse(system, y[:, c], 1e-13, 2000) for c in range(NUM_Q)], 1)
    ref = np.linalg.solve(system.toarray(), y)
    np.testing.assert_allclose(scores, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("k, kq, alpha", [(10, 5, 0.99), (25, 10, 0.9), (5, 3, 0.5)])
def test_end_to_end_equals_independent_closed_form(data, k, kq, alpha):
    q, db = data
    ranks, scores = df.diffusion_ranking(
        q,
        db,
        graph_neighbors=k,
        query_neighbors=kq,
        alpha=alpha,
        tolerance=1e-13,
        max_iterations=2000,
    )
    ref = dense_scores(q, db, k, kq, 3.0, alpha)  # float64 similarities, loops, dense solve
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    reached = ref[:, 0] > 1e-6 * ref[:, 0].max()
    top = ranks[: int(reached.sum()), 0]
    np.testing.assert_array_equal(np.sort(top), np.flatnonzero(reached))


@pytest.mark.parametrize("iterations", [1, 3, df.DEFAULT_CG_ITERATIONS])
def test_truncated_cg_is_the_reference_iteration(data, iterations):
    """As dfs.m calls pcg(A, y, 1e-6, it): from 0, at most ``iterations`` steps."""
    q, db = data
    system = df.diffusion_system(db)
    sims = (db @ q.T).astype(np.float64)
    for c in range(NUM_Q):
        ids = np.argsort(-sims[:, c], kind="stable")[: df.DEFAULT_QUERY_NEIGHBORS]
        y = np.zeros(NUM_DB)
        y[ids] = np.maximum(sims[ids, c], 0) ** 3
        ref = textbook_cg(system.toarray(), y, df.DEFAULT_CG_TOLERANCE, iterations)
        got = df.diffuse(system, y, df.DEFAULT_CG_TOLERANCE, iterations)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    if iterations == 1:  # one step is far from the solution: truncation is really exercised
        exact = np.linalg.solve(system.toarray(), y)
        assert np.abs(got - exact).max() > 1e-2 * np.abs(exact).max()


def test_defaults(data):
    q, db = data
    assert (df.DEFAULT_ALPHA, df.DEFAULT_GAMMA) == (0.99, 3.0)
    assert (df.DEFAULT_GRAPH_NEIGHBORS, df.DEFAULT_QUERY_NEIGHBORS) == (50, 10)
    assert (df.DEFAULT_CG_TOLERANCE, df.DEFAULT_CG_ITERATIONS) == (1e-6, 20)
    _, scores = df.diffusion_ranking(q, db)
    ref = dense_scores(q, db, 50, 10, 3.0, 0.99)
    np.testing.assert_allclose(scores, ref, atol=1e-5 * np.abs(ref).max())


def test_ranking_layout_and_ties(data):
    q, db = data
    ranks, scores = df.diffusion_ranking(q, db, graph_neighbors=3, query_neighbors=2)
    assert ranks.shape == (NUM_DB, NUM_Q) and ranks.dtype == np.int64
    sims = db @ q.T
    for c in range(NUM_Q):
        col = ranks[:, c]
        assert sorted(col) == list(range(NUM_DB))
        keys = list(zip(-scores[col, c], -sims[col, c], col))
        assert keys == sorted(keys)
        assert np.sum(scores[:, c] == 0) > 0  # a sparse graph leaves unreached images ...
        unreached = col[scores[col, c] == 0]  # ... ordered by cosine similarity
        assert np.all(np.diff(sims[unreached, c]) <= 0)


def test_isolated_node_keeps_its_y(data):
    _, db = data
    rng = np.random.default_rng(0)
    cluster = np.eye(DIM)[0] + 0.05 * rng.normal(size=(10, DIM))
    far = l2_normalize(np.concatenate([cluster, np.eye(DIM)[1:2]]))  # row 10: no mutual kNN
    a = df.knn_affinity(far, 3)
    assert a[10].nnz == 0
    s = df.transition_matrix(a)
    assert np.all(np.isfinite(s.toarray()))
    system = df.diffusion_system(far, 3)
    y = np.zeros(11)
    y[10] = 0.7
    np.testing.assert_allclose(df.diffuse(system, y), y, atol=1e-12)


def test_single_neighbor_graph_is_empty_and_errors(data):
    q, db = data
    assert df.knn_affinity(db, 1).nnz == 0
    with pytest.raises(SearchError, match=r"alpha must be in \[0, 1\).*got 1.0"):
        df.diffusion_system(db, alpha=1.0)
    with pytest.raises(SearchError, match=r"system must be \[N, N\] for the N = 120.*\(5, 5\)"):
        df.diffusion_ranking(q, db, system=df.diffusion_system(db[:5]))
    with pytest.raises(SearchError, match="query_neighbors must be an integer >= 1, got 0"):
        df.diffusion_ranking(q, db, query_neighbors=0)
    with pytest.raises(SearchError, match="database rows must be L2-normalised"):
        df.knn_affinity(db * 0.5)
