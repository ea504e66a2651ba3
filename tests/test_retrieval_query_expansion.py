"""alphaQE and DBA against loop-based brute force; the re-ranking helper's layout and ties."""

import numpy as np
import pytest

from delg_tf.retrieval import query_expansion as qe
from delg_tf.retrieval.search import SearchError, l2_normalize

NUM_DB, NUM_Q, DIM = 300, 12, 24


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(15, DIM))
    db = centers[rng.integers(0, 15, NUM_DB)] + 0.4 * rng.normal(size=(NUM_DB, DIM))
    q = centers[rng.integers(0, 15, NUM_Q)] + 0.4 * rng.normal(size=(NUM_Q, DIM))
    return l2_normalize(q), l2_normalize(db)


def brute_expand(x, pool, n, alpha, exclude_self):
    """One row at a time: sort all similarities, skip itself, weight max(s, 0)^alpha."""
    out = np.zeros_like(x, dtype=np.float64)
    for r in range(x.shape[0]):
        sims = [
            (float(np.dot(x[r], pool[j])), j)
            for j in range(pool.shape[0])
            if not (exclude_self and j == r)
        ]
        sims.sort(key=lambda t: (-t[0], t[1]))
        total = x[r].astype(np.float64).copy()
        for s, j in sims[:n]:
            total += max(s, 0.0) ** alpha * pool[j]
        out[r] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("n, alpha", [(1, 3.0), (5, 3.0), (10, 0.0), (7, 1.5)])
def test_alpha_query_expansion_equals_brute_force(data, n, alpha):
    q, db = data
    got = qe.alpha_query_expansion(q, db, n, alpha=alpha, chunk_size=37)
    np.testing.assert_allclose(got, brute_expand(q, db, n, alpha, False), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("k, alpha", [(1, 3.0), (4, 3.0), (9, 2.0)])
def test_database_augmentation_equals_brute_force(data, k, alpha):
    _, db = data
    got = qe.database_augmentation(db, k, alpha=alpha, chunk_size=64)
    np.testing.assert_allclose(got, brute_expand(db, db, k, alpha, True), atol=2e-6)


def test_zero_neighbors_is_identity_and_too_many_are_clipped(data):
    q, db = data
    np.testing.assert_array_equal(qe.alpha_query_expansion(q, db, 0), q)
    np.testing.assert_array_equal(qe.database_augmentation(db, 0), db)
    small = db[:6]
    np.testing.assert_allclose(
        qe.alpha_query_expansion(q, small, 50), brute_expand(q, small, 6, 3.0, False), atol=2e-6
    )
    np.testing.assert_allclose(
        qe.database_augmentation(small, 50), brute_expand(small, small, 5, 3.0, True), atol=2e-6
    )
    np.testing.assert_array_equal(qe.database_augmentation(db[:1], 3), db[:1])


def test_duplicates_keep_exactly_one_self_weight(data):
    _, db = data
    dup = np.concatenate([db[:20], db[:1]])  # row 20 duplicates row 0
    ids, _ = qe.database_neighbors(dup, 3)
    assert ids.shape == (21, 3)
    assert all(r not in ids[r] for r in range(21))
    assert 20 in ids[0] and 0 in ids[20]


def test_negative_similarities_get_zero_weight():
    x = np.array([[1.0, 0.0]], dtype=np.float32)
    db = np.array([[-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(qe.alpha_query_expansion(x, db, 2), x, atol=1e-7)
    np.testing.assert_allclose(qe.alpha_weights(np.array([-0.5, 0.5]), 3.0), [0.0, 0.125])


def test_expanded_ranking_layout_and_oracle(data):
    q, db = data
    ranks, scores = qe.expanded_ranking(q, db, qe_neighbors=3, dba_neighbors=4)
    assert ranks.shape == (NUM_DB, NUM_Q) and ranks.dtype == np.int64
    assert scores.shape == (NUM_DB, NUM_Q)
    db_aug = brute_expand(db, db, 4, 3.0, True)
    q_exp = brute_expand(q, db_aug, 3, 3.0, False)
    ref_scores = db_aug @ q_exp.T
    np.testing.assert_allclose(scores, ref_scores, atol=3e-6)
    for c in range(NUM_Q):
        assert sorted(ranks[:, c]) == list(range(NUM_DB))
        assert np.all(np.diff(scores[ranks[:, c], c]) <= 0)
    # No expansion at all: the plain cosine ranking.
    plain, plain_scores = qe.expanded_ranking(q, db, qe_neighbors=0)
    np.testing.assert_allclose(plain_scores, db @ q.T, atol=1e-6)


def test_ranking_ties_by_increasing_database_id():
    scores = np.array([[0.5, 0.1], [0.9, 0.1], [0.5, 0.7], [0.9, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(qe.ranking_from_scores(scores), [[1, 2], [3, 0], [0, 1], [2, 3]])


def test_errors_name_the_problem(data):
    q, db = data
    with pytest.raises(SearchError, match=r"database rows must be L2-normalised.*has norm 2"):
        qe.alpha_query_expansion(q, 2 * db, 3)
    with pytest.raises(SearchError, match="queries 23 vs database 24"):
        qe.alpha_query_expansion(l2_normalize(q[:, :23]), db, 3)
    with pytest.raises(SearchError, match="num_neighbors must be an integer >= 0, got -1"):
        qe.database_augmentation(db, -1)
    with pytest.raises(SearchError, match=r"got shape \(24,\)"):
        qe.database_augmentation(db[0], 2)
    with pytest.raises(SearchError, match="alpha must be >= 0"):
        qe.alpha_query_expansion(q, db, 2, alpha=-1.0)
