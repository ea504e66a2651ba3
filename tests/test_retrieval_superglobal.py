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
