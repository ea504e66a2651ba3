"""Significant RANSAC inliers (a-contrario NFA) and the fused re-ranking rule."""

import math

import numpy as np
import pytest

from delg_tf.matching import synthetic as syn
from delg_tf.matching.pair import MatchingConfig
from delg_tf.retrieval import significance as sig
from delg_tf.retrieval.rerank import Reranker


def exact_nfa(k, n, p):
    return (n - 3) * math.comb(n, k) * math.comb(k, 3) * p ** (k - 3)


def exact_log_nfa(k, n, p):
    """Integer binomials (exact), so no float overflow or underflow."""
    return (
        math.log(n - 3)
        + math.log(math.comb(n, k))
        + math.log(math.comb(k, 3))
        + (k - 3) * math.log(p)
    )


@pytest.mark.parametrize("n", [4, 10, 57, 300])
def test_log_false_alarms_is_the_binomial_formula(n):
    p = 0.0163
    for k in range(4, n + 1, max(1, n // 9)):
        assert sig.log_false_alarms(k, n, p) == pytest.approx(
            exact_log_nfa(k, n, p), rel=1e-9, abs=1e-9
        )
    # 3 matches or fewer always fit an affine map: never evidence.
    assert np.isinf(sig.log_false_alarms(3, n, p)) and np.isinf(sig.log_false_alarms(2, 3, p))


def test_significance_threshold_grows_with_the_putative_matches():
    p = np.pi * 20.0**2 / (320 * 240)
    thresholds = [sig.min_significant_inliers(n, p) for n in (10, 50, 200, 1000)]
    assert thresholds == sorted(thresholds) and thresholds[1] == 12
    for n, k in zip((10, 50, 200, 1000), thresholds):
        assert exact_nfa(k, n, p) <= 1.0 < exact_nfa(k - 1, n, p)
    np.testing.assert_array_equal(
        sig.significant_inliers([11, 12, 40], [50, 50, 50], p), [0, 12, 40]
    )
    assert sig.min_significant_inliers(100, 1.0) is None  # a match lands anywhere: no test.


def test_chance_probability_from_the_query_keypoints():
    corners = np.array([[0.0, 0.0], [240.0, 320.0], [100.0, 50.0]])
    assert sig.chance_inlier_probability(corners, 20.0) == pytest.approx(np.pi * 400 / (240 * 320))
    assert sig.chance_inlier_probability(corners[:1], 20.0) == 1.0
    assert sig.chance_inlier_probability(np.zeros((5, 2)), 20.0) == 1.0
    assert sig.chance_inlier_probability(corners, 1e4) == 1.0


def test_fused_rule_drops_a_chance_consensus_below_the_global_order():
    rng = np.random.default_rng(0)
    size = (240.0, 320.0)
    query = syn.make_query(rng, 200, 32, size)
    true = syn.make_db_image(rng, query, 40, 20, 200, size).features
    false = [syn.make_db_image(rng, query, 0, 60, 200, size).features for _ in range(3)]
    feats = [*false, true]  # global order: the 3 negatives first, the positive last.
    with Reranker(MatchingConfig(ransac_iterations=200), 4, 1) as reranker:
        inliers, putative = reranker.count_matches(query, feats, range(4))
        fused = sig.rerank_query_significant(reranker, query, np.arange(4), feats)
    assert (inliers[:3] > 3).all() and inliers[3] >= 30  # chance inliers, then true ones.
    np.testing.assert_array_equal(fused.num_inliers, [0, 0, 0, inliers[3]])
    np.testing.assert_array_equal(fused.ranking, [3, 0, 1, 2])  # negatives keep global order.
    assert putative.min() >= inliers.min()
