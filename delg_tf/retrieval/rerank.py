"""Re-ranking a global-feature shortlist by local-feature geometric verification.

DELG (Cao et al. ECCV 2020), Sec. 4.1: the top 100 images of the global ranking
are re-ranked by the number of RANSAC inliers (affine model) of their local
features with the query; ties are broken by the global similarity. Images
beyond the shortlist keep their global order after it. App. B gives the
matching parameters (descriptor threshold 1.0 / 1.1 for DELG*, residual
threshold 20 px, 1000 iterations, minimum inliers 0).

Pairs are verified in a thread pool: numpy's matrix product and pycolmap's
RANSAC both release the GIL, so threads use all cores without pickling features.
While the pool runs, the BLAS library is limited to one thread per worker
(:func:`limit_blas_threads`): OpenBLAS's own threads on these small products
oversubscribe the cores, and their spin-waiting makes matching several times
slower on a loaded machine (measured in ``bench/rerank.py``).

Keypoint convention: ``LocalFeatures.keypoints`` are pixel coordinates in the
original (uncropped/unscaled) image as **(y, x)** = (row, col), the DELF/DELG
convention. Geometric verification gives the same inlier count for (x, y) as
long as query and database use the same order; only visualisation cares.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Union

import numpy as np

from delg_tf.matching import correspondences as corr

DEFAULT_SHORTLIST_SIZE = 100  # paper Sec. 4.1.
DEFAULT_MIN_INLIERS = 0  # paper App. B: any returned match counts.
DEFAULT_RANSAC_RESIDUAL_THRESHOLD = 20.0  # pixels, paper App. B.
DEFAULT_RANSAC_ITERATIONS = 1000  # paper App. B.
DEFAULT_NUM_WORKERS = 2
DEFAULT_RATIO_TEST = 0.8
KEYPOINT_DIM = 2


# (setter, getter) symbol names of OpenBLAS builds numpy may bundle.
_OPENBLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _openblas_controls():
    """(set, get) functions of the loaded OpenBLAS, or None (non-Linux, MKL, ...)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so[\.\d]*)", f.read())))
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                return getattr(lib, set_name), getattr(lib, get_name)
    return None


@contextlib.contextmanager
def limit_blas_threads(num_threads: int = 1):
    """Temporarily limits BLAS threads (process-wide), restoring them afterwards.

    Uses threadpoolctl when installed, else OpenBLAS's own setter found among
    the loaded libraries; does nothing if neither is available.

    Args:
        num_threads: BLAS threads while the context is active.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=num_threads, user_api="blas"):
            yield
        return
    controls = _openblas_controls()
    if controls is None:
        yield
        return
    set_threads, get_threads = controls
    previous = int(get_threads())
    set_threads(int(num_threads))
    try:
        yield
    finally:
        set_threads(previous)


@dataclasses.dataclass
class LocalFeatures:
    """Local features of one image.

    Attributes:
        keypoints: float [N, 2] pixel coordinates (y, x) in the original image.
        descriptors: float [N, D] (L2-normalised) or uint8 [N, D/8] packed bits.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self):
        kp = np.asarray(self.keypoints, dtype=np.float64)
        desc = np.asarray(self.descriptors)
        if kp.size == 0:
            kp = kp.reshape(0, KEYPOINT_DIM)
        if desc.size == 0 and desc.ndim != 2:
            desc = desc.reshape(0, 0)
        if kp.ndim != 2 or kp.shape[1] != KEYPOINT_DIM:
            raise ValueError(f"keypoints must be [N, 2] (y, x), got shape {kp.shape}.")
        if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
            raise ValueError(
                f"descriptors must be [N, D] with N = {kp.shape[0]} keypoints, "
                f"got shape {desc.shape}."
            )
        self.keypoints, self.descriptors = kp, desc

    def __len__(self):
        return self.keypoints.shape[0]


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    """Local matching parameters (paper App. B defaults for retrieval).

    Attributes:
        descriptor_threshold: L2 distance threshold for putative matches
            (float DELG 1.0; binarised DELG* 1.1; GLDv2-recognition 0.9).
        ransac_residual_threshold: inlier threshold in pixels (20; 10 for recognition).
        ransac_iterations: RANSAC trials (1000).
        min_inliers: pairs with fewer inliers score 0 (0 for retrieval).
        use_ratio_test: replace the distance threshold by Lowe's ratio test.
        ratio_test_threshold: ratio for the ratio test.
        mutual_nearest: additionally require mutual nearest neighbours.
        binary_descriptors: descriptors are packed sign bits (DELG*).
        seed: RANSAC seed.
    """

    descriptor_threshold: float = corr.DEFAULT_DESCRIPTOR_THRESHOLD
    ransac_residual_threshold: float = DEFAULT_RANSAC_RESIDUAL_THRESHOLD
    ransac_iterations: int = DEFAULT_RANSAC_ITERATIONS
    min_inliers: int = DEFAULT_MIN_INLIERS
    use_ratio_test: bool = False
    ratio_test_threshold: float = DEFAULT_RATIO_TEST
    mutual_nearest: bool = False
    binary_descriptors: bool = False
    seed: int = 0


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
    from delg_tf.matching import colmap_ransac

    q_idx, d_idx = corr.find_putative_matches(
        query.descriptors,
        db.descriptors,
        threshold=None if config.use_ratio_test else config.descriptor_threshold,
        ratio=config.ratio_test_threshold if config.use_ratio_test else None,
        mutual=config.mutual_nearest,
        binary=config.binary_descriptors,
    )
    # Official DELF convention: fit database -> query locations.
    res = colmap_ransac.estimate_affine_ransac(
        db.keypoints[d_idx],
        query.keypoints[q_idx],
        residual_threshold=config.ransac_residual_threshold,
        iterations=config.ransac_iterations,
        seed=config.seed,
    )
    num = res.num_inliers if res.num_inliers >= config.min_inliers else 0
    return PairMatch(q_idx, d_idx, res.inlier_mask, num, res.model)


def rerank_order(num_inliers: np.ndarray, global_scores: np.ndarray) -> np.ndarray:
    """Paper's re-ranking rule: by inliers, ties broken by global similarity.

    Args:
        num_inliers: int [K] inliers of each shortlist entry.
        global_scores: float [K] global similarities (higher = better). Entries
            tied on both keep their input order.

    Returns:
        int [K] permutation of the shortlist positions, best first.
    """
    num_inliers = np.asarray(num_inliers)
    global_scores = np.asarray(global_scores, dtype=np.float64)
    if num_inliers.shape != global_scores.shape or num_inliers.ndim != 1:
        raise ValueError(
            f"num_inliers and global_scores must be 1-D of equal length, got "
            f"{num_inliers.shape} and {global_scores.shape}."
        )
    # lexsort is stable and sorts by the last key first.
    return np.lexsort((-global_scores, -num_inliers.astype(np.int64)))


@dataclasses.dataclass
class RerankResult:
    """Re-ranking of one query.

    Attributes:
        ranking: int [R] database ids, re-ranked shortlist followed by the rest.
        shortlist: int [K] the global shortlist (before re-ranking).
        num_inliers: int [K] inliers for each shortlist entry (global order).
    """

    ranking: np.ndarray
    shortlist: np.ndarray
    num_inliers: np.ndarray


FeatureSource = Union[Sequence[LocalFeatures], Callable[[int], LocalFeatures]]


class Reranker:
    """Re-ranks global shortlists with geometric verification, using a thread pool.

    Args:
        config: matching parameters.
        shortlist_size: number of top global results to verify (paper: 100).
        num_workers: threads (1 = run in the calling thread).
    """

    def __init__(
        self,
        config: MatchingConfig = MatchingConfig(),
        shortlist_size: int = DEFAULT_SHORTLIST_SIZE,
        num_workers: int = DEFAULT_NUM_WORKERS,
    ):
        if shortlist_size < 0 or num_workers < 1:
            raise ValueError(
                f"need shortlist_size >= 0 and num_workers >= 1, got "
                f"{shortlist_size} and {num_workers}."
            )
        self.config = config
        self.shortlist_size = shortlist_size
        self.num_workers = num_workers
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 1 else None

    def close(self):
        """Shuts the thread pool down."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _map(self, fn, items):
        with limit_blas_threads(1):
            if self._pool is None:
                return list(map(fn, items))
            return list(self._pool.map(fn, items))

    def count_inliers(
        self, query: LocalFeatures, db_features: FeatureSource, db_ids: Sequence[int]
    ) -> np.ndarray:
        """Inlier counts of ``query`` against each database image in ``db_ids``.

        Args:
            query: query local features.
            db_features: sequence indexed by db id, or a callable ``id -> LocalFeatures``.
            db_ids: database ids to verify.

        Returns:
            int64 [len(db_ids)].
        """
        get = db_features if callable(db_features) else db_features.__getitem__
        return np.asarray(
            self._map(lambda i: match_pair(query, get(int(i)), self.config).num_inliers, db_ids),
            dtype=np.int64,
        ).reshape(-1)

    def rerank_query(
        self,
        query: LocalFeatures,
        ranking: np.ndarray,
        db_features: FeatureSource,
        global_scores: Optional[np.ndarray] = None,
    ) -> RerankResult:
        """Re-ranks the top ``shortlist_size`` of one query's global ranking.

        Args:
            query: query local features.
            ranking: int [R] database ids in global order (best first).
            db_features: local features by database id.
            global_scores: float [R] global similarities aligned with ``ranking``
                (default: decreasing with rank, i.e. ties keep global order).

        Returns:
            RerankResult.
        """
        ranking = np.asarray(ranking, dtype=np.int64).ravel()
        k = min(self.shortlist_size, ranking.size)
        shortlist = ranking[:k]
        if global_scores is None:
            scores = -np.arange(k, dtype=np.float64)
        else:
            global_scores = np.asarray(global_scores, dtype=np.float64).ravel()
            if global_scores.shape != ranking.shape:
                raise ValueError(
                    f"global_scores must align with ranking: {global_scores.shape} vs "
                    f"{ranking.shape}."
                )
            scores = global_scores[:k]
        inliers = self.count_inliers(query, db_features, shortlist)
        order = rerank_order(inliers, scores)
        return RerankResult(np.concatenate([shortlist[order], ranking[k:]]), shortlist, inliers)

    def rerank_all(
        self,
        ranks: np.ndarray,
        query_features: Sequence[LocalFeatures],
        db_features: FeatureSource,
        scores: Optional[np.ndarray] = None,
        progress: Optional[Callable] = None,
    ) -> np.ndarray:
        """Re-ranks every query of a revisitop-layout ranking.

        Args:
            ranks: int [num_db, num_queries], column q = ranked db ids.
            query_features: num_queries LocalFeatures.
            db_features: local features by database id.
            scores: optional float [num_db, num_queries] similarities indexed by
                db id (not by rank), used to break ties.
            progress: optional wrapper for the query iterator (e.g. tqdm).

        Returns:
            int64 [num_db, num_queries] re-ranked ranking.
        """
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.ndim != 2 or ranks.shape[1] != len(query_features):
            raise ValueError(
                f"ranks must be [num_db, num_queries={len(query_features)}], got {ranks.shape}."
            )
        out = ranks.copy()
        queries = range(ranks.shape[1])
        for q in (progress(queries) if progress else queries):
            col_scores = None if scores is None else np.asarray(scores)[ranks[:, q], q]
            out[:, q] = self.rerank_query(
                query_features[q], ranks[:, q], db_features, col_scores
            ).ranking
        return out
