"""Geometric verification of one image pair: putative matches + affine RANSAC.

DELG (Cao et al. ECCV 2020), Sec. 4.1 and App. B: local descriptors are matched
by nearest neighbour under a distance threshold (:mod:`correspondences`), then an
affine model is fitted by RANSAC (:mod:`colmap_ransac`); the inlier count is the
pair's score. :class:`MatchingConfig` holds the parameters (paper defaults in
:mod:`defaults`), validated once at construction.

:func:`match_pair` releases the GIL (numpy's matrix product and pycolmap), so
callers verify many pairs from threads (``delg_tf.retrieval.rerank.Reranker``).
Inside such a pool the BLAS library should run one thread per worker
(:func:`limit_blas_threads`): BLAS's own threads on these small products
oversubscribe the cores, and their spin-waiting makes matching several times
slower on a loaded machine (measured in ``bench/rerank.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

from delg_tf.configs import expect
from delg_tf.matching import correspondences as corr
from delg_tf.matching import defaults
from delg_tf.matching.features import LocalFeatures


def limit_blas_threads(num_threads: int = 1):
    """Context manager limiting the BLAS threads (process-wide), restored on exit.

    threadpoolctl finds the loaded BLAS (OpenBLAS, MKL, BLIS, ...) and sets its
    thread count.

    Args:
        num_threads: BLAS threads while the context is active.

    Returns:
        A ``threadpoolctl.threadpool_limits`` context manager.
    """
    return threadpool_limits(limits=num_threads, user_api="blas")


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    """Local matching parameters (paper App. B defaults for retrieval).

    Each attribute but `mutual_nearest` is also a ``python -m delg_tf.evaluate`` flag
    (this section is their help).

    Attributes:
        descriptor_threshold: Putative match L2 distance threshold, > 0 (paper: 1.0;
            DELG*: 1.1; GLDv2-recognition: 0.9).
        ransac_residual_threshold: RANSAC residual (inlier) threshold in px, > 0
            (paper: 20; GLDv2-recognition: 10).
        ransac_iterations: RANSAC iterations, >= 1 (paper: 1000).
        min_inliers: Minimum inliers to count a match (fewer score 0), >= 0 (paper: 0).
        use_ratio_test: Select putative matches by Lowe's ratio test instead of the
            distance threshold.
        ratio_test_threshold: Ratio of the ratio test (--use_ratio_test), in (0, 1].
        mutual_nearest: additionally require mutual nearest neighbours.
        binary_descriptors: Match packed-bit local descriptors (binarised DELG*; use
            --descriptor_threshold=1.1).
        seed: RANSAC seed.

    Raises:
        ConfigError: a value out of range (names the field, in ``error.field``).
    """

    descriptor_threshold: float = defaults.DEFAULT_DESCRIPTOR_THRESHOLD
    ransac_residual_threshold: float = defaults.DEFAULT_RANSAC_RESIDUAL_THRESHOLD
    ransac_iterations: int = defaults.DEFAULT_RANSAC_ITERATIONS
    min_inliers: int = defaults.DEFAULT_MIN_INLIERS
    use_ratio_test: bool = False
    ratio_test_threshold: float = defaults.DEFAULT_RATIO_TEST
    mutual_nearest: bool = False
    binary_descriptors: bool = False
    seed: int = defaults.DEFAULT_RANSAC_SEED

    def __post_init__(self):
        checks = (
            (self.descriptor_threshold > 0, "descriptor_threshold", "a float > 0"),
            (self.ransac_residual_threshold > 0, "ransac_residual_threshold", "a float > 0"),
            (self.ransac_iterations >= 1, "ransac_iterations", "an integer >= 1"),
            (self.min_inliers >= 0, "min_inliers", "an integer >= 0"),
            (0 < self.ratio_test_threshold <= 1, "ratio_test_threshold", "a float in (0, 1]"),
        )
        field_defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for ok, name, expected in checks:
            expect(
                ok,
                name,
                expected,
                getattr(self, name),
                owner="MatchingConfig",
                fix=f"pass such a value or keep the default {field_defaults[name]!r}",
            )


@dataclasses.dataclass
class PairMatch:
    """Verified matches between a query and one database image.

    Attributes:
        query_idx: int [M] putative-match indices into the query features.
        db_idx: int [M] indices into the database features.
        inlier_mask: bool [M].
        num_inliers: score used for re-ranking (0 if below min_inliers).
        model: affine [2, 3] mapping db keypoints to query keypoints, or None.
    """

    query_idx: np.ndarray
    db_idx: np.ndarray
    inlier_mask: np.ndarray
    num_inliers: int
    model: Optional[np.ndarray]


def match_pair(
    query: LocalFeatures, db: LocalFeatures, config: MatchingConfig = MatchingConfig()
) -> PairMatch:
    """Putative matching + affine RANSAC for one image pair.

    Args:
        query: query local features.
        db: database image local features.
        config: matching parameters.

    Returns:
        PairMatch; 0 inliers (no crash) when either image has no features or
        there are too few putative matches.

    Raises:
        corr.DescriptorMismatchError: descriptor dimensions differ.
    """
    q_idx, d_idx = corr.find_putative_matches(
        query.descriptors, db.descriptors, **putative_match_options(config)
    )
    return verify_pair(query, db, q_idx, d_idx, config)


def putative_match_options(config: MatchingConfig) -> dict:
    """Keyword arguments of ``find_putative_matches(_batch)`` for ``config``."""
    return dict(
        threshold=None if config.use_ratio_test else config.descriptor_threshold,
        ratio=config.ratio_test_threshold if config.use_ratio_test else None,
        mutual=config.mutual_nearest,
        binary=config.binary_descriptors,
    )


def verify_pair(
    query: LocalFeatures,
    db: LocalFeatures,
    q_idx: np.ndarray,
    d_idx: np.ndarray,
    config: MatchingConfig = MatchingConfig(),
) -> PairMatch:
    """Affine RANSAC on putative matches ``(q_idx, d_idx)``; below ``min_inliers`` scores 0.

    Fits database -> query locations (official DELF convention).
    """
    from delg_tf.matching import colmap_ransac

    res = colmap_ransac.estimate_affine_ransac(
        db.keypoints[d_idx],
        query.keypoints[q_idx],
        residual_threshold=config.ransac_residual_threshold,
        iterations=config.ransac_iterations,
        seed=config.seed,
    )
    num = res.num_inliers if res.num_inliers >= config.min_inliers else 0
    return PairMatch(q_idx, d_idx, res.inlier_mask, num, res.model)
