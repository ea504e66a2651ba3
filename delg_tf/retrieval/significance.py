"""Geometric evidence fused with global similarity: RANSAC inliers that count only when significant.

The paper's rule (Cao et al. ECCV 2020, Sec. 4.1) sorts a shortlist by RANSAC
inliers, global similarity breaking ties only. A pair of unrelated images still
gets a few inliers by chance (any 3 matches fit an affine map exactly, and a
20 px disc catches stray matches), so "inliers first" can put a chance consensus
above a true match that the global descriptor ranked first. Here an inlier count
is used only when it is *significant*, i.e. unlikely for an unrelated pair with
the same number of putative matches; the other images keep their global order.

Derivation (the a-contrario test of Moisan & Stival, IJCV 2004, as ORSA uses it:
Moisan, Moulon, Monasse, IPOL 2012; here with the affine minimal sample of 3):

* Null hypothesis H0, "unrelated pair": of the n putative matches (x_j, y_j),
  x_j a database keypoint and y_j a query keypoint, the y_j are independent and
  uniformly distributed over the region R the query's keypoints cover (their
  bounding box, area A), independently of the x_j.
* For an affine map T fixed independently of match j,
  P(|T(x_j) - y_j| <= r) <= pi r^2 / A =: p (the disc of radius r around T(x_j),
  r the RANSAC residual threshold, has at most that share of R), p clipped to 1.
* RANSAC's models are fits through 3 matches. "Some k-subset S of the matches and
  some 3-subset s of S have the k - 3 others of S within r of the affine map
  through s" has, for one (S, s), probability <= p^(k - 3) (the map depends on s
  only, the others are independent of it), so with the union bound over the
  C(n, k) C(k, 3) choices, and over the n - 3 sizes k = 4..n tested,
  the expected number of such chance consensuses (number of false alarms) is

      NFA(k) = (n - 3) C(n, k) C(k, 3) p^(k - 3).

* A count k is significant when NFA(k) <= epsilon = 1: fewer than one chance
  consensus of k matches is expected in an unrelated pair (the a-contrario
  convention; the decision depends on epsilon only through log epsilon).

Fused re-ranking (``rerank=ransac_fused`` of ``python -m delg_tf.evaluate``):
score_i = inliers_i if significant else 0, the shortlist sorted by score, ties
(in particular every non-significant image) by global similarity. So significant
geometric evidence ranks first, weighed by its inlier count as in the paper, and
where geometry is not conclusive the global descriptor decides. Nothing is fitted
to a dataset: r is the RANSAC threshold, n and A come from the pair.

Approximations: LO-RANSAC refines its model on the inliers (not exactly a map
through 3 matches), and DELG keeps a location at several pyramid scales, so
matches are not fully independent; both make chance consensuses somewhat larger
than the bound, i.e. the test is slightly permissive.

Cost: O(shortlist) on top of the matching; numpy + scipy.special.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.special import gammaln

from delg_tf.matching.features import LocalFeatures
from delg_tf.retrieval.rerank import FeatureSource, Reranker, RerankResult, rerank_order

AFFINE_SAMPLE_SIZE = 3  # matches that determine an affine map of the plane.
MAX_FALSE_ALARMS = 1.0  # epsilon: the a-contrario meaningfulness threshold.


def chance_inlier_probability(query_keypoints: np.ndarray, residual_threshold: float) -> float:
    """Chance p = min(1, pi r^2 / A) that a uniformly placed match lands within r of a map.

    Args:
        query_keypoints: float [N, 2] query keypoints (y, x) or (x, y); A is the area of
            their bounding box.
        residual_threshold: RANSAC inlier distance r in pixels.

    Returns:
        p in (0, 1]; 1 when the keypoints span no area (nothing can be significant).
    """
    points = np.asarray(query_keypoints, dtype=np.float64).reshape(-1, 2)
    if points.shape[0] < 2:
        return 1.0
    extent = points.max(axis=0) - points.min(axis=0)
    area = float(extent[0] * extent[1])
    if area <= 0.0:
        return 1.0
    return float(min(1.0, np.pi * float(residual_threshold) ** 2 / area))


def _log_binomial(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def log_false_alarms(num_inliers, num_matches, probability: float) -> np.ndarray:
    """Log of NFA(k) = (n - 3) C(n, k) C(k, 3) p^(k - 3) (module docstring).

    Args:
        num_inliers: int [...] k.
        num_matches: int [...] n (putative matches given to RANSAC).
        probability: p of :func:`chance_inlier_probability`.

    Returns:
        float64 [...]; +inf where k <= 3 or n <= 3 (3 matches always fit: no evidence).
    """
    k = np.asarray(num_inliers, dtype=np.float64)
    n = np.asarray(num_matches, dtype=np.float64)
    k, n = np.broadcast_arrays(k, n)
    out = np.full(k.shape, np.inf)
    ok = (k > AFFINE_SAMPLE_SIZE) & (n > AFFINE_SAMPLE_SIZE) & (k <= n)
    if probability <= 0.0:
        out[ok] = -np.inf
        return out
    kk, nn = k[ok], n[ok]
    out[ok] = (
        np.log(nn - AFFINE_SAMPLE_SIZE)
        + _log_binomial(nn, kk)
        + _log_binomial(kk, np.float64(AFFINE_SAMPLE_SIZE))
        + (kk - AFFINE_SAMPLE_SIZE) * np.log(probability)
    )
    return out


def significant_inliers(
    num_inliers, num_matches, probability: float, max_false_alarms: float = MAX_FALSE_ALARMS
) -> np.ndarray:
    """The inlier counts with NFA <= epsilon, 0 for the others.

    Args:
        num_inliers: int [K] RANSAC inliers of each shortlist image.
        num_matches: int [K] their putative matches.
        probability: p of the query (:func:`chance_inlier_probability`).
        max_false_alarms: epsilon (a-contrario convention: 1).

    Returns:
        int64 [K].
    """
    num_inliers = np.asarray(num_inliers, dtype=np.int64)
    keep = log_false_alarms(num_inliers, num_matches, probability) <= np.log(max_false_alarms)
    return np.where(keep, num_inliers, 0).astype(np.int64)


def min_significant_inliers(
    num_matches: int, probability: float, max_false_alarms: float = MAX_FALSE_ALARMS
) -> Optional[int]:
    """Smallest significant inlier count for n putative matches (None if none is).

    For reports: with p = pi 20^2 / (320 x 240) ~ 0.016 and n = 50 it is 12.
    """
    counts = np.arange(AFFINE_SAMPLE_SIZE + 1, int(num_matches) + 1)
    ok = significant_inliers(counts, num_matches, probability, max_false_alarms) > 0
    return int(counts[ok][0]) if ok.any() else None


def rerank_query_significant(
    reranker: Reranker,
    query: LocalFeatures,
    ranking: np.ndarray,
    db_features: FeatureSource,
    global_scores: Optional[np.ndarray] = None,
) -> RerankResult:
    """:meth:`Reranker.rerank_query` with significant inliers only (the fused rule).

    Args:
        reranker: matching settings and shortlist size (its ``config`` gives r).
        query: query local features.
        ranking: int [R] database ids in global order.
        db_features: local features by database id.
        global_scores: float [R] global similarities aligned with ``ranking`` (default:
            decreasing with rank).

    Returns:
        RerankResult whose ``num_inliers`` are the significant counts (0 = not
        significant), in global shortlist order.
    """
    ranking = np.asarray(ranking, dtype=np.int64).ravel()
    k = min(reranker.shortlist_size, ranking.size)
    shortlist = ranking[:k]
    if global_scores is None:
        scores = -np.arange(k, dtype=np.float64)
    else:
        scores = np.asarray(global_scores, dtype=np.float64).ravel()[:k]
    inliers, matches = reranker.count_matches(query, db_features, shortlist)
    probability = chance_inlier_probability(
        query.keypoints, reranker.config.ransac_residual_threshold
    )
    significant = significant_inliers(inliers, matches, probability)
    order = rerank_order(significant, scores)
    return RerankResult(np.concatenate([shortlist[order], ranking[k:]]), shortlist, significant)
