"""Re-ranking a global-feature shortlist by local-feature geometric verification.

DELG (Cao et al. ECCV 2020), Sec. 4.1: the top 100 images of the global ranking
are re-ranked by the number of RANSAC inliers (affine model) of their local
features with the query; ties are broken by the global similarity. Images
beyond the shortlist keep their global order after it. The verification of one
pair and its parameters (App. B) are in :mod:`delg_tf.matching.pair`.

Pairs are verified in a thread pool: numpy's matrix product and pycolmap's
RANSAC both release the GIL, so threads use all cores without pickling features.
Each pool task takes a group of shortlist images: it loads their features,
finds the putative matches of the whole group against the query at once
(:func:`delg_tf.matching.correspondences.find_putative_matches_batch`, the same
matches as :func:`delg_tf.matching.pair.match_pair`), then runs the RANSAC of
each pair, so at most one group's features per worker are held in memory.
That call first screens the group with bfloat16 products (TensorFlow / oneDNN,
AMX where available) whose rigorous error bound rules out all but a few
descriptor pairs, which are recomputed and certified; it falls back to the
float32 product where the screen cannot run or decide, with the same matches
either way. While the pool
runs, the BLAS library is limited to one thread per worker
(:func:`delg_tf.matching.pair.limit_blas_threads`; measured in ``bench/rerank.py``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from delg_tf.matching import correspondences as corr
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import (
    MatchingConfig,
    limit_blas_threads,
    putative_match_options,
    verify_pair,
)

DEFAULT_SHORTLIST_SIZE = 100  # paper Sec. 4.1.
DEFAULT_NUM_WORKERS = 2
# Pool tasks per worker in count_inliers (groups of shortlist images). One: each task's
# bfloat16 screen is one TensorFlow call with a fixed cost, and fewer, larger calls won over
# the balance of several smaller groups (top-100 of bench/rerank.py on 2 cores: 87 ms per
# query with 1 task per worker, 103 ms with 4, 116 ms with 8).
TASKS_PER_WORKER = 1


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
        screen: the bfloat16 screen of
            :func:`~delg_tf.matching.correspondences.find_putative_matches_batch`
            (None: where it can run and pays off, the default, see
            :func:`~delg_tf.matching.correspondences.screen_pays_off`; False: float32
            only; True: always, raise where it cannot run). The inlier counts do not
            depend on it.
    """

    def __init__(
        self,
        config: MatchingConfig = MatchingConfig(),
        shortlist_size: int = DEFAULT_SHORTLIST_SIZE,
        num_workers: int = DEFAULT_NUM_WORKERS,
        screen: Optional[bool] = None,
    ):
        if shortlist_size < 0 or num_workers < 1:
            raise ValueError(
                f"need shortlist_size >= 0 and num_workers >= 1, got "
                f"{shortlist_size} and {num_workers}."
            )
        self.config = config
        self.shortlist_size = shortlist_size
        self.num_workers = num_workers
        self.screen = screen
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

        The same counts as ``match_pair(query, db, config).num_inliers`` for each
        image: the putative matches of a group of images come from one
        :func:`~delg_tf.matching.correspondences.find_putative_matches_batch` call
        (identical arrays), then each pair runs the same RANSAC and ``min_inliers`` rule.

        Args:
            query: query local features.
            db_features: sequence indexed by db id, or a callable ``id -> LocalFeatures``.
            db_ids: database ids to verify.

        Returns:
            int64 [len(db_ids)].
        """
        return self.count_matches(query, db_features, db_ids)[0]

    def count_matches(
        self, query: LocalFeatures, db_features: FeatureSource, db_ids: Sequence[int]
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Inlier and putative-match counts of ``query`` against each image in ``db_ids``.

        Args:
            query: query local features.
            db_features: sequence indexed by db id, or a callable ``id -> LocalFeatures``.
            db_ids: database ids to verify.

        Returns:
            (inliers int64 [len(db_ids)], as :meth:`count_inliers`; putative int64
            [len(db_ids)], the putative matches RANSAC was given).
        """
        get = db_features if callable(db_features) else db_features.__getitem__
        ids = [int(i) for i in db_ids]
        num_tasks = max(1, min(len(ids), self.num_workers * TASKS_PER_WORKER))
        groups = [g.tolist() for g in np.array_split(np.asarray(ids, dtype=np.int64), num_tasks)]
        counts = self._map(lambda group: self._count_group(query, [get(i) for i in group]), groups)
        pairs = np.asarray([c for group in counts for c in group], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def _count_group(self, query: LocalFeatures, feats: Sequence[LocalFeatures]) -> list:
        """(inliers, putative matches) of one group of database images (one pool task)."""
        config = self.config
        matches = corr.find_putative_matches_batch(
            query.descriptors,
            [f.descriptors for f in feats],
            screen=self.screen,
            **putative_match_options(config),
        )
        return [
            (verify_pair(query, db, q_idx, d_idx, config).num_inliers, int(q_idx.size))
            for db, (q_idx, d_idx) in zip(feats, matches)
        ]

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
        for q in progress(queries) if progress else queries:
            col_scores = None if scores is None else np.asarray(scores)[ranks[:, q], q]
            out[:, q] = self.rerank_query(
                query_features[q], ranks[:, q], db_features, col_scores
            ).ranking
        return out
