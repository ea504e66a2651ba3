"""Evaluation from extracted features: global search, re-ranking, revisitop metrics.

DELG retrieval (Cao et al. ECCV 2020, Sec. 4.1): rank the database by global
descriptor similarity, re-rank the top 100 by the number of affine-RANSAC
inliers of local features (ties by global similarity), and report revisitop
Easy/Medium/Hard mAP and mP@k for both rankings.

Inputs are numpy arrays, so this module does not depend on how features were
extracted; :func:`load_store_features` reads them from a delg_tf HDF5 feature
store (``delg_tf.extraction.store``, imported lazily).

Keypoints are **(y, x)** pixel coordinates in the original image (DELF
convention; the store's ``locations``). Query features must be extracted from
the query image *cropped to its bbx*, with keypoints in the cropped frame.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from delg_tf.evaluation.config import FULL_RANKING, EvaluateConfig
from delg_tf.evaluation.ranks import write_json
from delg_tf.evaluation.revisitop import (
    MISSING_ID,
    evaluate_revisitop,
    format_results_table,
)
from delg_tf.matching.features import LocalFeatures
from delg_tf.retrieval import search
from delg_tf.retrieval.rerank import Reranker


class FeatureInputError(ValueError):
    """Features do not match the dataset (counts, dimensions, missing images)."""


def _max_gnd_index(gnd: Sequence[Mapping]) -> int:
    """Largest database index referenced by the ground truth (-1 if none)."""
    indices = [
        np.ravel(np.asarray(g.get(k, []), dtype=np.int64))
        for g in gnd
        for k in ("easy", "hard", "junk")
    ]
    indices = [i for i in indices if i.size]
    return int(max(i.max() for i in indices)) if indices else -1


@dataclasses.dataclass
class FeaturesEvaluation:
    """Result of :func:`evaluate_features`.

    Attributes:
        global_ranks: int [R, num_queries] ranking by global similarity; R = num_db,
            or ``config.top_k`` for a truncated ranking (trailing -1 = no result).
        reranked_ranks: int [R, num_queries] after re-ranking (None if skipped).
        results: ``{"global": metrics, "reranked": metrics}`` (percent).
        timings: seconds per stage.
        global_scores: float [R, num_queries] similarity of each ``global_ranks`` entry.
        truncated: the rankings do not list the whole database.
        ranking: JSON summary ``{"search_method", "rows", "num_db", "num_queries",
            "truncated"}``.
    """

    global_ranks: np.ndarray
    reranked_ranks: Optional[np.ndarray]
    results: dict
    timings: dict
    global_scores: Optional[np.ndarray] = None
    truncated: bool = False
    ranking: dict = dataclasses.field(default_factory=dict)


def global_ranking(db_global: np.ndarray, query_global: np.ndarray, config: EvaluateConfig):
    """Ranks the database for every query by global similarity (cosine).

    With ``config.top_k == 0`` and exact search: the complete ranking (revisitop
    layout). Otherwise a :class:`~delg_tf.retrieval.search.GlobalIndex`
    (``config.search_method``) returns the top-k of each query only, so memory is
    ``O(k * num_queries)`` instead of ``O(num_db * num_queries)`` (+1M distractors).
    Ties are broken by increasing database id in both cases.

    Args:
        db_global: float [num_db, D].
        query_global: float [num_queries, D].
        config: ``search_method`` and ``top_k``.

    Returns:
        (ranks int64 [R, num_queries], scores float32 [R, num_queries] aligned with
        ranks, truncated bool). Approximate indexes may pad a column with -1.
    """
    num_db = db_global.shape[0]
    if config.top_k == FULL_RANKING and config.search_method == "exact":
        ranks, by_id = search.full_ranking(
            search.l2_normalize(query_global), search.l2_normalize(db_global)
        )
        return ranks, np.take_along_axis(by_id, ranks, axis=0), False
    k = num_db if config.top_k == FULL_RANKING else min(config.top_k, num_db)
    index = search.GlobalIndex(config.search_method, seed=config.matching.seed).build(db_global)
    ids, scores = index.search(query_global, k)
    ranks = np.ascontiguousarray(ids.T)
    truncated = k < num_db or bool((ranks == MISSING_ID).any())
    return ranks, np.ascontiguousarray(scores.T), truncated


def rerank_ranking(
    ranks: np.ndarray,
    scores: np.ndarray,
    query_local: Sequence[LocalFeatures],
    db_local,
    config: EvaluateConfig,
    binary: bool = False,
    progress: Optional[Callable] = None,
) -> np.ndarray:
    """Re-ranks the top ``config.shortlist_size`` of each column by RANSAC inliers.

    Args:
        ranks: int [R, num_queries] global ranking (full or truncated, -1 padding last).
        scores: float [R, num_queries] global similarities aligned with ``ranks``.
        query_local: LocalFeatures of each query.
        db_local: LocalFeatures by database id (sequence or callable ``id -> LocalFeatures``).
        config: matching settings, shortlist size, workers.
        binary: packed-bit descriptors (DELG*).
        progress: optional iterator wrapper (tqdm).

    Returns:
        int64 [R, num_queries] re-ranked ranking (entries after the shortlist unchanged).
    """
    out = ranks.copy()
    queries = range(ranks.shape[1])
    matching = dataclasses.replace(config.matching, binary_descriptors=binary)
    with Reranker(matching, config.shortlist_size, config.num_workers) as reranker:
        for q in progress(queries) if progress else queries:
            valid = int(np.count_nonzero(ranks[:, q] != MISSING_ID))
            result = reranker.rerank_query(
                query_local[q], ranks[:valid, q], db_local, scores[:valid, q]
            )
            out[:valid, q] = result.ranking
    return out


def evaluate_features(
    db_global: np.ndarray,
    query_global: np.ndarray,
    gnd: Sequence[Mapping],
    db_local=None,
    query_local: Optional[Sequence[LocalFeatures]] = None,
    config: EvaluateConfig = EvaluateConfig(),
    binary: bool = False,
    output_json=None,
    progress: Optional[Callable] = None,
    verbose: bool = True,
    extra_json: Optional[Mapping] = None,
) -> FeaturesEvaluation:
    """Global-only vs re-ranked revisitop evaluation from feature arrays.

    Args:
        db_global: float [num_db, D] global descriptors (normalised here).
        query_global: float [num_queries, D].
        gnd: revisitop ground truth (dicts with easy/hard/junk), one per query.
        db_local: num_db LocalFeatures (keypoints (y, x), descriptors [N, d]), or a
            callable ``db_id -> LocalFeatures`` (read on demand, e.g.
            :meth:`StoreFeatures.local`); None to skip re-ranking.
        query_local: num_queries LocalFeatures of the cropped queries.
        config: shortlist size, matching thresholds, workers, kappas, and the global
            search (``search_method``, ``top_k``; see :func:`global_ranking`).
        binary: local descriptors are packed bits (DELG*).
        output_json: if given, the JSON ``{"global": {...}, "reranked": {...},
            "ranking": {...}, "config": {...}, "timings": {...}}`` is written there.
        progress: optional iterator wrapper (e.g. tqdm) over queries.
        verbose: print the results table.
        extra_json: more top-level entries for the JSON (e.g. dataset, failed images).

    Returns:
        FeaturesEvaluation.

    Raises:
        FeatureInputError: counts or dimensions do not match the ground truth.
    """
    db_global = np.asarray(db_global, dtype=np.float32)
    query_global = np.asarray(query_global, dtype=np.float32)
    if query_global.ndim != 2 or query_global.shape[0] != len(gnd):
        raise FeatureInputError(
            f"query_global must be [num_queries={len(gnd)}, D], got {query_global.shape}."
        )
    if db_global.ndim != 2 or db_global.shape[1] != query_global.shape[1]:
        raise FeatureInputError(
            f"db_global must be [num_db, D={query_global.shape[1]}], got {db_global.shape}."
        )
    max_index = _max_gnd_index(gnd)
    if max_index >= db_global.shape[0]:
        raise FeatureInputError(
            f"the ground truth refers to database image {max_index} but only "
            f"{db_global.shape[0]} database descriptors were given."
        )
    rerank = db_local is not None and query_local is not None and config.shortlist_size > 0
    num_db_local = db_global.shape[0] if callable(db_local) or not rerank else len(db_local)
    if rerank and (num_db_local != db_global.shape[0] or len(query_local) != len(gnd)):
        raise FeatureInputError(
            f"need one LocalFeatures per image: got {num_db_local} database (expected "
            f"{db_global.shape[0]}) and {len(query_local)} queries (expected {len(gnd)})."
        )
    timings = {}
    start = time.perf_counter()
    ranks, scores, truncated = global_ranking(db_global, query_global, config)
    timings["global_search_s"] = time.perf_counter() - start
    results = {"global": evaluate_revisitop(ranks, gnd, config.kappas)}
    reranked = None
    if rerank:
        start = time.perf_counter()
        reranked = rerank_ranking(
            ranks, scores, query_local, db_local, config, binary, progress=progress
        )
        timings["rerank_s"] = time.perf_counter() - start
        results["reranked"] = evaluate_revisitop(reranked, gnd, config.kappas)
    if verbose:
        print(format_results_table(results, config.kappas))
        if truncated:
            print(
                f"(ranking truncated to the global top {ranks.shape[0]} of "
                f"{db_global.shape[0]}: positives beyond it count as not retrieved)"
            )
    ranking_info = {
        "search_method": config.search_method,
        "rows": int(ranks.shape[0]),
        "num_db": int(db_global.shape[0]),
        "num_queries": int(query_global.shape[0]),
        "truncated": bool(truncated),
    }
    if output_json is not None:
        write_json(
            {
                **results,
                "ranking": ranking_info,
                **dict(extra_json or {}),
                "config": config.record(),
                "timings": timings,
            },
            output_json,
        )
    return FeaturesEvaluation(
        ranks, reranked, results, timings, scores, truncated, ranking_info
    )


class StoreFeatures:
    """Features of a list of images from a delg_tf feature store, as LocalFeatures.

    The evaluation view of :class:`delg_tf.extraction.store.StoreSelection`: global
    descriptors of ``names`` are read at once (``global_``, float32 [len(names), D]);
    local features only on demand (:meth:`local`), so a +1M-image store is never
    loaded whole: re-ranking reads the shortlisted images.

    Args:
        store_path: ``.h5`` store file, a parts directory, or the shard files of
            ``extract --num_shards`` (a list, or a glob such as
            ``OUT/features-*-of-00004.h5``); see
            :class:`delg_tf.extraction.store.FeatureStore`.
        names: image names in dataset order (revisitop ``imlist``/``qimlist``,
            without extension; ``.jpg`` etc. and a ``jpg/`` prefix are tried too).
        binary: serve packed-bit descriptors (``descriptors_binary``, DELG*).
        allow_missing: images absent from the store (e.g. failed extraction, listed
            in the extractor's ``errors.tsv``) get a zero global descriptor and no
            local features (score 0, 0 inliers) and are listed in ``missing``;
            otherwise a missing image is an error.
        what: name of the flag/file for error messages.

    Attributes:
        global_: float32 [len(names), D].
        missing: names not found in the store.

    Raises:
        StoreError: the store is missing, an image is missing (unless
            ``allow_missing``), or the store lacks the descriptors asked for.
    """

    def __init__(
        self,
        store_path,
        names: Sequence[str],
        binary: bool = False,
        allow_missing: bool = False,
        what: str = "feature store",
    ):
        from delg_tf.extraction.store import open_selection

        self.binary = binary
        self._selection = open_selection(store_path, names, binary, allow_missing, what)
        self.global_ = self._selection.global_
        self.missing = self._selection.missing

    def __len__(self):
        return len(self._selection)

    def local(self, i: int) -> LocalFeatures:
        """LocalFeatures of image ``i`` (position in ``names``), read from the store."""
        return LocalFeatures(*self._selection.local(i))

    def all_local(self) -> list:
        """LocalFeatures of every image (for small sets, e.g. the queries)."""
        return [self.local(i) for i in range(len(self))]

    def close(self):
        """Closes the store's HDF5 files."""
        self._selection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_store_features(store_path, names: Sequence[str], binary: bool = False):
    """Reads global and local features of ``names`` from a delg_tf HDF5 feature store.

    Args:
        store_path: store file, parts directory or shard files (see :class:`StoreFeatures`).
        names: image names in dataset order (revisitop ``imlist``/``qimlist``,
            without extension; ``.jpg`` is tried too).
        binary: return packed-bit descriptors (``descriptors_binary``, DELG*).

    Returns:
        (global float32 [len(names), D], list of LocalFeatures with (y, x) keypoints).

    Raises:
        StoreError: an image is missing or the store has no global descriptors.
    """
    with StoreFeatures(store_path, names, binary, what=str(store_path)) as store:
        return store.global_, store.all_local()


def evaluate_store_features(
    gnd: Sequence[Mapping],
    db: StoreFeatures,
    queries: StoreFeatures,
    config: EvaluateConfig,
    output_json=None,
    progress: Optional[Callable] = None,
    verbose: bool = True,
    extra_json: Optional[Mapping] = None,
) -> FeaturesEvaluation:
    """:func:`evaluate_features` on opened stores; database local features read on demand."""
    return evaluate_features(
        db.global_,
        queries.global_,
        gnd,
        db.local,
        queries.all_local(),
        config,
        config.matching.binary_descriptors,
        output_json=output_json,
        progress=progress,
        verbose=verbose,
        extra_json=extra_json,
    )


def evaluate_stores(
    gnd_path,
    db_store,
    query_store,
    config: EvaluateConfig,
    output_json,
    binary: bool = False,
    progress: Optional[Callable] = None,
) -> Path:
    """Revisitop evaluation from feature stores (database and cropped queries).

    Args:
        gnd_path: revisitop ground truth (.pkl/.mat).
        db_store: feature store of the database images.
        query_store: feature store of the queries (cropped to bbx); may equal db_store
            only if the stored query features were extracted from crops.
        config: evaluation settings (``top_k``/``search_method`` for large databases).
        output_json: JSON output path.
        binary: use packed-bit descriptors.
        progress: optional iterator wrapper.

    Returns:
        Path of the JSON written.
    """
    from delg_tf.data.revisitop import load_gnd

    cfg = load_gnd(gnd_path, require_bbx=False)
    if binary and not config.matching.binary_descriptors:
        matching = dataclasses.replace(config.matching, binary_descriptors=True)
        config = dataclasses.replace(config, matching=matching)
    with StoreFeatures(db_store, cfg["imlist"], binary, what="--db_features") as db, StoreFeatures(
        query_store, cfg["qimlist"], binary, what="--query_features"
    ) as queries:
        evaluate_store_features(cfg["gnd"], db, queries, config, output_json, progress)
    return Path(output_json)
