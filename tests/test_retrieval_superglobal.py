"""SuperGlobal re-ranking against a loop transcription of the authors' MDescAug + RerankwMDA."""

import numpy as np
import pytest

from delg_tf.retrieval import superglobal as sg
from delg_tf.retrieval.search import SearchError, l2_normalize

NUM_DB, NUM_Q, DIM = 250, 8, 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(12, DIM))
    db = centers[rng.integers(0, 12, NUM_DB)] + 0.6 * rng.normal(size=(NUM_DB, DIM))
    q = centers[rng.integers(0, 12, NUM_Q)] + 0.6 * rng.normal(size=(NUM_Q, DIM))
    return l2_normalize(q), l2_normalize(db)


def reference_superglobal(X, Q, M, K, beta):
    """Line by line the steps of SuperGlobal's MDescAug.forward and RerankwMDA.forward.

    One query and one shortlisted image at a time, float64, python sorts (stable). As in
    the code, the K + 1 most similar shortlisted images *including itself* are taken and
    the first gets weight 1, the others beta * similarity; the refined descriptor is the
    weighted sum over the weight sum. Returns (ranks [N, Q], final scores [M', Q]).
    """
    X = X.astype(np.float64)
    Q = Q.astype(np.float64)
    ranks = np.argsort(-(X @ Q.T), axis=0, kind="stable")
    k_self = K + 1  # self.K = K + 1 in both modules
    out = ranks.copy()
    m = min(M, X.shape[0])
    all_scores = np.zeros((m, Q.shape[0]))
    for q in range(Q.shape[0]):
        top = ranks[:M, q]
        x = X[top]
        x_dba = np.zeros_like(x)
        for i in range(m):  # MDescAug
            sims = sorted(((float(x[i] @ x[j]), j) for j in range(m)), key=lambda t: -t[0])
            acc, wsum = np.zeros(X.shape[1]), 0.0
            for rank, (value, j) in enumerate(sims[:k_self]):
                weight = 1.0 if rank == 0 else beta * value
                acc += weight * x[j]
                wsum += weight
            x_dba[i] = acc / wsum
        res_dba = [float(Q[q] @ x_dba[i]) for i in range(m)]
        pre = sorted(range(m), key=lambda i: -res_dba[i])  # ranks_trans_1000_pre
        rerank_dba_final = top[pre]
        values = [res_dba[i] for i in pre]  # ranks_value_trans_1000
        x1 = np.max([x_dba[pre[t]] for t in range(min(k_self, m))], axis=0)
        res_rerank = [(values[t] + float(x1 @ x_dba[pre[t]])) / 2.0 for t in range(m)]
        final = sorted(range(m), key=lambda t: -res_rerank[t])
        out[:, q] = np.concatenate([rerank_dba_final[final], ranks[M:, q]])
        all_scores[:, q] = [res_rerank[t] for t in final]
    return out, all_scores


def assert_separated(scores, gap=1e-5):
    """The oracle's consecutive final scores differ, so float32 cannot swap them."""
    assert np.min(np.abs(np.diff(scores, axis=0))) > gap


@pytest.mark.parametrize("M, K, beta", [(40, 9, 0.15), (25, 3, 0.5), (60, 0, 0.15), (12, 30, 0.15)])
def test_matches_reference_transcription(data, M, K, beta):
    q, db = data
    ranks, scores = sg.superglobal_rerank(q, db, top_m=M, num_neighbors=K, beta=beta)
    ref_ranks, ref_scores = reference_superglobal(db, q, M, K, beta)
    assert_separated(ref_scores)
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")
    assert np.any(ranks[:M] != initial[:M]), "re-ranking should move something here"


def test_defaults_and_m_larger_than_database(data):
    q, db = data
    small = db[:120]
    ranks, scores = sg.superglobal_rerank(q, small)  # M = 400 > 120
    ref_ranks, ref_scores = reference_superglobal(
        small, q, sg.DEFAULT_TOP_M, sg.DEFAULT_NUM_NEIGHBORS, sg.DEFAULT_BETA
    )
    assert ranks.shape == (120, NUM_Q) and scores.shape == (120, NUM_Q)
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
    assert (sg.DEFAULT_TOP_M, sg.DEFAULT_NUM_NEIGHBORS, sg.DEFAULT_BETA) == (400, 9, 0.15)


def test_order_beyond_m_unchanged_and_shortlist_permuted(data):
    q, db = data
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")
    ranks, _ = sg.superglobal_rerank(q, db, top_m=30)
    np.testing.assert_array_equal(ranks[30:], initial[30:])
    np.testing.assert_array_equal(np.sort(ranks[:30], axis=0), np.sort(initial[:30], axis=0))


def test_m_zero_and_one_keep_the_ranking(data):
    q, db = data
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")
    ranks, scores = sg.superglobal_rerank(q, db, top_m=0)
    np.testing.assert_array_equal(ranks, initial)
    assert scores.shape == (0, NUM_Q)
    ranks, scores = sg.superglobal_rerank(q, db, top_m=1)
    np.testing.assert_array_equal(ranks, initial)
    # One image: d' = d, q' = d, S = (q.d + 1) / 2.
    top_sims = (db @ q.T)[initial[0], np.arange(NUM_Q)]
    np.testing.assert_allclose(scores[0], (top_sims + 1.0) / 2.0, atol=1e-6)


def test_k_zero_is_plain_max_query_expansion(data):
    q, db = data
    short = db[:20]
    final, refined = sg.superglobal_scores(q[0], short, num_neighbors=0)
    sims = short @ q[0]
    np.testing.assert_allclose(refined, sims, atol=1e-6)
    best = short[np.argmax(sims)]
    np.testing.assert_allclose(final, (sims + short @ best) / 2.0, atol=1e-6)


def test_refinement_formula_on_a_tiny_shortlist():
    d = l2_normalize(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))
    refined = sg.refine_shortlist(d, num_neighbors=1, beta=0.5)
    # Row 0: nearest other is row 1 (s = 0.8) -> (d0 + 0.4 d1) / 1.4.
    np.testing.assert_allclose(refined[0], (d[0] + 0.4 * d[1]) / 1.4, atol=1e-6)
    # Row 2: nearest other is row 1 (s = 0.6) -> (d2 + 0.3 d1) / 1.3.
    np.testing.assert_allclose(refined[2], (d[2] + 0.3 * d[1]) / 1.3, atol=1e-6)
    np.testing.assert_array_equal(sg.refine_shortlist(d, num_neighbors=0), d)


def test_given_truncated_ranks(data):
    q, db = data
    full, _ = sg.superglobal_rerank(q, db, top_m=20)
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")
    ranks, scores = sg.superglobal_rerank(q, db, top_m=20, ranks=initial[:50])
    assert ranks.shape == (50, NUM_Q) and scores.shape == (20, NUM_Q)
    np.testing.assert_array_equal(ranks, full[:50])


def test_errors_name_the_problem(data):
    q, db = data
    with pytest.raises(SearchError, match=r"ranks must be an integer array \[R, Q\].*\(250, 7\)"):
        sg.superglobal_rerank(q, db, ranks=np.zeros((250, 7), dtype=np.int64))
    with pytest.raises(SearchError, match=r"database ids in \[0, 250\), got values in \[-1, 0\]"):
        sg.superglobal_rerank(q, db, ranks=-np.eye(10, NUM_Q, dtype=np.int64))
    with pytest.raises(SearchError, match="beta must be >= 0"):
        sg.superglobal_rerank(q, db, beta=-0.1)
    with pytest.raises(SearchError, match="top_m must be an integer >= 0, got -3"):
        sg.superglobal_rerank(q, db, top_m=-3)
    with pytest.raises(SearchError, match="queries rows must be L2-normalised"):
        sg.superglobal_rerank(3 * q, db)


# --- Fast path: offline neighbour graph + batched online re-ranking -------------------


def brute_force_graph(X, L):
    """float64 top-L other rows of each row, ties by increasing id, and the next value."""
    X = X.astype(np.float64)
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : X.shape[0] - 1]
    values = np.take_along_axis(sims, order, axis=1)
    keep = min(L, X.shape[0] - 1)
    tail = values[:, keep] if keep < X.shape[0] - 1 else np.full(X.shape[0], -np.inf)
    return order[:, :keep], values[:, :keep], tail


def fast(q, db, M, K, beta, list_size=sg.DEFAULT_LIST_SIZE, ranks=None, normalized=True):
    graph = sg.build_neighbor_graph(db, list_size=list_size, normalized=normalized)
    if ranks is None:
        ranks = np.argsort(-(l2_normalize(db) @ q.T), axis=0, kind="stable")
    stats = {}
    out, scores = sg.superglobal_rerank_graph(q, db, ranks, graph, M, K, beta, stats=stats)
    return out, scores, stats


def duplicated_data(seed=5, num_distinct=40, dim=8):
    """Database of exact copies (2-6 of each vector), queries near some of them."""
    rng = np.random.default_rng(seed)
    base = l2_normalize(rng.normal(size=(num_distinct, dim)))
    copies = rng.integers(2, 7, num_distinct)
    db = np.repeat(base, copies, axis=0)[rng.permutation(copies.sum())]
    q = l2_normalize(base[:6] + 0.3 * rng.normal(size=(6, dim)))
    return q, db


@pytest.mark.parametrize("list_size", [1, 5, 32, 400])
def test_neighbor_graph_is_the_brute_force_top_l(data, list_size):
    _, db = data
    graph = sg.build_neighbor_graph(db, list_size=list_size, normalized=True, chunk_size=64)
    ids, sims, tail = brute_force_graph(db, list_size)
    np.testing.assert_array_equal(graph.ids, ids)
    np.testing.assert_allclose(graph.sims, sims, rtol=0, atol=1e-12)
    np.testing.assert_allclose(graph.tail, tail, rtol=0, atol=1e-12)
    assert graph.list_size == min(list_size, NUM_DB - 1)


def test_neighbor_graph_normalises_like_l2_normalize(data):
    _, db = data
    scaled = db * np.random.default_rng(3).uniform(0.5, 4.0, (NUM_DB, 1))
    graph = sg.build_neighbor_graph(scaled, list_size=10)
    ids, sims, _ = brute_force_graph(l2_normalize(scaled), 10)
    np.testing.assert_array_equal(graph.ids, ids)
    np.testing.assert_allclose(graph.sims, sims, atol=1e-12)
    rows = np.arange(5)
    np.testing.assert_array_equal(
        graph.unit_rows(rows), l2_normalize(scaled)[rows].astype(np.float64)
    )


@pytest.mark.parametrize(
    "M, K, beta, list_size",
    [(40, 9, 0.15, 32), (25, 3, 0.5, 3), (60, 0, 0.15, 1), (12, 30, 0.15, 32), (400, 9, 0.15, 9)],
)
def test_fast_path_matches_reference_and_transcription(data, M, K, beta, list_size):
    q, db = data
    ranks, scores, stats = fast(q, db, M, K, beta, max(list_size, min(K, NUM_DB - 1)))
    ref_ranks, ref_scores = sg.superglobal_rerank(q, db, top_m=M, num_neighbors=K, beta=beta)
    oracle_ranks, oracle_scores = reference_superglobal(db, q, M, K, beta)
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_array_equal(ranks, oracle_ranks)
    np.testing.assert_allclose(scores, oracle_scores, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert sum(stats.values()) == NUM_Q * min(M, NUM_DB)


def test_fast_path_uses_every_stage(data):
    """Short lists (L = K) leave rows to stage 2 (K found further down the list) and 3."""
    q, db = data
    _, _, stats = fast(q, db, 40, 5, 0.15, list_size=8)
    assert stats["stage 1"] > 0 and stats["stage 2"] > 0 and stats["stage 3"] > 0, stats


def test_fast_path_unnormalised_database(data):
    q, db = data
    scaled = db * np.random.default_rng(4).uniform(0.5, 4.0, (NUM_DB, 1)).astype(np.float32)
    ranks, scores, _ = fast(q, scaled, 40, 9, 0.15, normalized=False)
    ref_ranks, ref_scores = sg.superglobal_rerank(q, l2_normalize(scaled), top_m=40)
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("K, list_size", [(3, 32), (9, 9), (9, 64)])
def test_fast_path_exact_duplicates_and_ties(K, list_size):
    """Exact copies: tied neighbours at the K-th place, tied refined and final scores;
    ties resolve by shortlist position as in the reference and the transcription."""
    q, db = duplicated_data()
    M = 60
    ranks, scores, stats = fast(q, db, M, K, 0.15, list_size)
    ref_ranks, ref_scores = sg.superglobal_rerank(q, db, top_m=M, num_neighbors=K)
    oracle_ranks, _ = reference_superglobal(db, q, M, K, 0.15)
    assert np.any(np.diff(ref_scores, axis=0) == 0), "the data should produce exact ties"
    assert stats["stage 3"] > 0, stats
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_array_equal(ranks, oracle_ranks)
    np.testing.assert_array_equal(scores, ref_scores)


def test_fast_path_m_larger_than_database_and_small_batches(data, monkeypatch):
    q, db = data
    small = db[:120]
    ref_ranks, ref_scores = reference_superglobal(
        small, q, sg.DEFAULT_TOP_M, sg.DEFAULT_NUM_NEIGHBORS, sg.DEFAULT_BETA
    )
    ranks, scores, _ = fast(q, small, sg.DEFAULT_TOP_M, sg.DEFAULT_NUM_NEIGHBORS, sg.DEFAULT_BETA)
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    # Batches of one or two queries: shortlists no longer cover the whole database.
    monkeypatch.setattr(sg, "BATCH_ELEMENTS", 60)
    assert sg._batch_size(NUM_DB, 40, NUM_Q) == 1
    ranks, _, _ = fast(q, db, 40, 9, 0.15)
    np.testing.assert_array_equal(ranks, reference_superglobal(db, q, 40, 9, 0.15)[0])


def test_fast_path_truncated_ranks_with_missing_results(data):
    """Columns of different lengths ending with -1, some shorter than K + 1 or empty."""
    q, db = data
    K, M = 9, 30
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")[:50]
    lengths = [50, 40, 30, 12, 10, 5, 1, 0]
    ranks = initial.copy()
    for j, n in enumerate(lengths):
        ranks[n:, j] = -1
    out, scores, stats = fast(q, db, M, K, 0.15, ranks=ranks)
    assert stats["small"] == 5 + 1
    for j, n in enumerate(lengths):
        expected = ranks[:, j].copy()
        if n:
            column, column_scores = sg.superglobal_rerank(
                q[j : j + 1], db, top_m=M, num_neighbors=K, ranks=ranks[:n, j : j + 1]
            )
            expected[:n] = column[:, 0]
            np.testing.assert_array_equal(scores[: min(n, M), j], column_scores[:, 0])
        np.testing.assert_array_equal(out[:, j], expected)
        assert np.all(scores[min(n, M) :, j] == 0)


def test_fast_path_k_zero_and_m_zero_one(data):
    q, db = data
    initial = np.argsort(-(db @ q.T), axis=0, kind="stable")
    for M in (0, 1, 2):
        ranks, scores, _ = fast(q, db, M, 0, 0.15)
        ref_ranks, ref_scores = sg.superglobal_rerank(q, db, top_m=M, num_neighbors=0)
        np.testing.assert_array_equal(ranks, ref_ranks)
        np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(fast(q, db, 0, 9, 0.15)[0], initial)


def test_fast_path_errors_name_the_problem(data):
    q, db = data
    graph = sg.build_neighbor_graph(db, list_size=4, normalized=True)
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    with pytest.raises(SearchError, match="graph was built for 250 database images.*has 100"):
        sg.superglobal_rerank_graph(q, db[:100], ranks, graph)
    with pytest.raises(SearchError, match="graph lists hold 4 neighbours, num_neighbors=9"):
        sg.superglobal_rerank_graph(q, db, ranks, graph)
    gap = ranks.copy()
    gap[3, 0] = -1
    with pytest.raises(SearchError, match=r"\(-1\) only at the end of a column"):
        sg.superglobal_rerank_graph(q, db, gap, graph, num_neighbors=2)
    twice = ranks.copy()
    twice[1, 0] = twice[0, 0]
    with pytest.raises(SearchError, match="database id twice"):
        sg.superglobal_rerank_graph(q, db, twice, graph, num_neighbors=2)
    with pytest.raises(SearchError, match=r"ranks must be an integer array \[R, Q\]"):
        sg.superglobal_rerank_graph(q, db, ranks[:, :3], graph, num_neighbors=2)
    with pytest.raises(SearchError, match="list_size must be an integer >= 0, got -1"):
        sg.build_neighbor_graph(db, list_size=-1)
