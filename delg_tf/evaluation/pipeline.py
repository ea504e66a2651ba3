"""Evaluation from extracted features: global search, re-ranking, revisitop metrics.

DELG retrieval (Cao et al. ECCV 2020, Sec. 4.1): rank the database by global
descriptor similarity, re-rank the top 100 by the number of affine-RANSAC
inliers of local features (ties by global similarity), and report revisitop
Easy/Medium/Hard mAP and mP@k for both rankings.

Post-processing (:func:`postprocess`, the ``EvaluateConfig`` fields ``dba``,
``query_expansion``, ``rerank``), in this order: DBA of the database and alphaQE
of the queries (:mod:`delg_tf.retrieval.query_expansion`) give the global ranking
the re-ranker starts from; then the re-ranker: RANSAC (the paper's), SuperGlobal
(:mod:`delg_tf.retrieval.superglobal`), SuperGlobal then RANSAC of the top of its
ranking, diffusion (:mod:`delg_tf.retrieval.diffusion`) or RANSAC with significant
inliers only (:mod:`delg_tf.retrieval.significance`). Each stage is timed
(:class:`StageTimer`); the results JSON lists them under ``postprocessing``.

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

from delg_tf.evaluation.config import (
    DBA_OFF,
    FULL_RANKING,
    QUERY_EXPANSION_AQE,
    RERANK_DIFFUSION,
    RERANK_RANSAC_FUSED,
    RERANK_SUPERGLOBAL_RANSAC,
    SUPERGLOBAL_RERANKERS,
    EvaluateConfig,
)
from delg_tf.evaluation.ranks import write_json
from delg_tf.evaluation.revisitop import (
    MISSING_ID,
    evaluate_revisitop,
    format_results_table,
)
from delg_tf.matching.features import LocalFeatures
from delg_tf.retrieval import search
from delg_tf.retrieval.rerank import Reranker

# Stages of the evaluation, in the order they run (results JSON "postprocessing").
STAGE_SEARCH = "search"  # global search with the descriptors as given (the "global" row).
STAGE_DBA = "dba"
STAGE_AQE = "aqe"
STAGE_SEARCH_EXPANDED = "search_expanded"  # global search after DBA / alphaQE.
STAGE_SUPERGLOBAL_GRAPH = "superglobal_graph"  # database-side neighbour lists (fast path).
STAGE_SUPERGLOBAL = "superglobal"
STAGE_RANSAC = "ransac"
STAGE_RANSAC_FUSED = "ransac_fused"
STAGE_DIFFUSION_GRAPH = "diffusion_graph"
STAGE_DIFFUSION = "diffusion"
# Database-side stages, run once for every query (their ms/query is amortised).
OFFLINE_STAGES = (STAGE_DBA, STAGE_SUPERGLOBAL_GRAPH, STAGE_DIFFUSION_GRAPH)
RERANK_STAGES = (
    STAGE_SUPERGLOBAL_GRAPH,
    STAGE_SUPERGLOBAL,
    STAGE_RANSAC,
    STAGE_RANSAC_FUSED,
    STAGE_DIFFUSION_GRAPH,
    STAGE_DIFFUSION,
)
MS_PER_SECOND = 1000.0


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
    expanded_ranks: Optional[np.ndarray] = None
    superglobal_ranks: Optional[np.ndarray] = None
    postprocessing: dict = dataclasses.field(default_factory=dict)


class StageTimer:
    """Wall time of each evaluation stage, in the order the stages ran.

    Args:
        num_queries: queries the stages serve (ms/query = seconds / num_queries).
    """

    def __init__(self, num_queries: int):
        self.num_queries = int(num_queries)
        self.seconds = {}

    def run(self, name: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, its wall time added to stage ``name``."""
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    def record(self) -> list:
        """``[{"stage", "seconds", "ms_per_query", "offline"}, ...]`` in run order."""
        return [
            {
                "stage": name,
                "seconds": seconds,
                "ms_per_query": MS_PER_SECOND * seconds / max(self.num_queries, 1),
                "offline": name in OFFLINE_STAGES,
            }
            for name, seconds in self.seconds.items()
        ]


def _nonzero_rows(x: np.ndarray) -> np.ndarray:
    """Rows with a descriptor, bool [N] (failed images have all-zero rows)."""
    return np.any(x != 0, axis=1)


def expand_descriptors(
    db_global: np.ndarray,
    query_global: np.ndarray,
    config: EvaluateConfig,
    timer: Optional[StageTimer] = None,
):
    """DBA of the database (``config.dba`` > 0) and alphaQE of the queries (``aqe``).

    Descriptors are L2-normalised first. DBA: each database row += its ``dba``
    nearest other rows weighted by similarity^``dba_alpha``
    (:func:`~delg_tf.retrieval.query_expansion.database_augmentation`); alphaQE: each
    query += its ``aqe_neighbours`` nearest rows of the (augmented) database,
    weighted by similarity^``aqe_alpha``
    (:func:`~delg_tf.retrieval.query_expansion.alpha_query_expansion`). All-zero
    rows (images whose extraction failed) are left out of both and stay zero.

    Args:
        db_global: float [num_db, D].
        query_global: float [num_queries, D].
        config: ``dba``, ``dba_alpha``, ``query_expansion``, ``aqe_neighbours``, ``aqe_alpha``.
        timer: records the ``dba`` and ``aqe`` stages.

    Returns:
        (database float32 [num_db, D], queries float32 [num_queries, D]), unit rows.
    """
    from delg_tf.retrieval import query_expansion as qe

    timer = timer if timer is not None else StageTimer(len(query_global))
    database = search.l2_normalize(db_global)
    queries = search.l2_normalize(query_global)
    db_ok, q_ok = _nonzero_rows(database), _nonzero_rows(queries)
    if config.dba != DBA_OFF and db_ok.any():
        augmented = timer.run(
            STAGE_DBA, qe.database_augmentation, database[db_ok], config.dba, config.dba_alpha
        )
        database = augmented if db_ok.all() else _scatter_rows(database, db_ok, augmented)
    if config.query_expansion == QUERY_EXPANSION_AQE and db_ok.any() and q_ok.any():
        expanded = timer.run(
            STAGE_AQE,
            qe.alpha_query_expansion,
            queries[q_ok],
            database[db_ok],
            config.aqe_neighbours,
            config.aqe_alpha,
        )
        queries = expanded if q_ok.all() else _scatter_rows(queries, q_ok, expanded)
    return database, queries


def _scatter_rows(base: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[mask] = rows
    return out


def superglobal_ranking(
    ranks: np.ndarray,
    db_global: np.ndarray,
    query_global: np.ndarray,
    config: EvaluateConfig,
    normalized: bool = False,
    graph=None,
) -> np.ndarray:
    """SuperGlobal re-ranking (MDescAug + RerankwMDA) of the top ``superglobal_m`` of each column.

    The computation of :func:`delg_tf.retrieval.superglobal.superglobal_rerank`
    (``superglobal_k`` neighbours, ``superglobal_beta``) per query, on the valid
    prefix of each column (a truncated ranking may end with -1), reading only the
    shortlisted database rows, so a +1M database is never normalised whole. With
    ``graph`` (:func:`~delg_tf.retrieval.superglobal.build_neighbor_graph` of
    ``db_global``, same ``normalized``) the same ranking by the batched fast path
    :func:`~delg_tf.retrieval.superglobal.superglobal_rerank_graph`.

    Args:
        ranks: int [R, num_queries] initial ranking.
        db_global: float [num_db, D] database descriptors.
        query_global: float [num_queries, D].
        config: ``superglobal_m``, ``superglobal_k``, ``superglobal_beta``.
        normalized: the descriptors are already L2-normalised (else each shortlist
            row is normalised, as :func:`~delg_tf.retrieval.search.l2_normalize`).
        graph: optional NeighborGraph of ``db_global`` (None: per-query reference).

    Returns:
        int64 [R, num_queries]: re-ranked shortlists, the rest unchanged.
    """
    from delg_tf.retrieval import superglobal as sg

    queries = (
        np.asarray(query_global, np.float32) if normalized else search.l2_normalize(query_global)
    )
    if graph is not None:
        k, beta = config.superglobal_k, config.superglobal_beta
        return sg.superglobal_rerank_graph(
            queries, db_global, ranks, graph, config.superglobal_m, k, beta
        )[0]
    out = np.array(ranks, dtype=np.int64, copy=True)
    for q in range(out.shape[1]):
        valid = int(np.count_nonzero(out[:, q] != MISSING_ID))
        size = min(config.superglobal_m, valid)
        if size == 0:
            continue
        ids = out[:size, q].copy()
        shortlist = np.asarray(db_global[ids], np.float32)
        if not normalized:
            shortlist = search.l2_normalize(shortlist)
        final, refined = sg.superglobal_scores(
            queries[q], shortlist, config.superglobal_k, config.superglobal_beta
        )
        out[:size, q] = ids[sg.rerank_shortlist(final, refined)]
    return out


def diffusion_ranking(
    database: np.ndarray,
    queries: np.ndarray,
    fallback_ranks: np.ndarray,
    config: EvaluateConfig,
    timer: Optional[StageTimer] = None,
) -> np.ndarray:
    """Diffusion ranking of the whole database (Iscen et al. CVPR 2017).

    :func:`delg_tf.retrieval.diffusion.diffusion_ranking` with the ``diffusion_*``
    settings; the graph (``diffusion_graph`` stage, database side) is built once.
    Images without a descriptor (all-zero rows) are not graph nodes and come last,
    by id; a query without a descriptor keeps its ``fallback_ranks`` column.

    Args:
        database: float [num_db, D], L2-normalised rows (or zero).
        queries: float [num_queries, D], L2-normalised rows (or zero).
        fallback_ranks: int [num_db, num_queries] the global ranking.
        config: ``diffusion_k``, ``diffusion_query_k``, ``diffusion_gamma``,
            ``diffusion_alpha``, ``diffusion_iterations``, ``diffusion_tolerance``.
        timer: records the ``diffusion_graph`` and ``diffusion`` stages.

    Returns:
        int64 [num_db, num_queries].
    """
    from delg_tf.retrieval import diffusion

    timer = timer if timer is not None else StageTimer(len(queries))
    db_ok, q_ok = _nonzero_rows(database), _nonzero_rows(queries)
    out = np.array(fallback_ranks, dtype=np.int64, copy=True)
    if not db_ok.any() or not q_ok.any():
        return out
    db_ids = np.flatnonzero(db_ok)
    system = timer.run(
        STAGE_DIFFUSION_GRAPH,
        diffusion.diffusion_system,
        database[db_ok],
        config.diffusion_k,
        config.diffusion_gamma,
        config.diffusion_alpha,
    )
    ranks, _ = timer.run(
        STAGE_DIFFUSION,
        diffusion.diffusion_ranking,
        queries[q_ok],
        database[db_ok],
        system=system,
        query_neighbors=config.diffusion_query_k,
        gamma=config.diffusion_gamma,
        tolerance=config.diffusion_tolerance,
        max_iterations=config.diffusion_iterations,
    )
    missing = np.flatnonzero(~db_ok)
    columns = np.concatenate(
        [db_ids[ranks], np.repeat(missing[:, None], ranks.shape[1], axis=1)], axis=0
    )
    out[:, q_ok] = columns
    return out


def global_ranking(
    db_global: np.ndarray,
    query_global: np.ndarray,
    config: EvaluateConfig,
    normalized: bool = False,
    index=None,
):
    """Ranks the database for every query by global similarity (cosine).

    With ``config.top_k == 0`` and exact search: the complete ranking (revisitop
    layout). Otherwise a :class:`~delg_tf.retrieval.search.GlobalIndex`
    (``config.search_method``) returns the top-k of each query only, so memory is
    ``O(k * num_queries)`` instead of ``O(num_db * num_queries)`` (+1M distractors).
    Ties are broken by increasing database id in both cases. With ``index`` (an index
    loaded from disk, :func:`open_index`) the top-k comes from it and ``db_global`` is
    not searched.

    Args:
        db_global: float [num_db, D].
        query_global: float [num_queries, D].
        config: ``search_method`` and ``top_k``.
        normalized: the rows are L2-normalised already (the exact full ranking then
            uses them as they are: ``database @ queries.T``).
        index: optional :class:`~delg_tf.retrieval.index.AlignedIndex` over the
            database (ids = database positions; needs ``config.top_k`` > 0).

    Returns:
        (ranks int64 [R, num_queries], scores float32 [R, num_queries] aligned with
        ranks, truncated bool). Approximate indexes may pad a column with -1.
    """
    num_db = db_global.shape[0]
    if index is not None:
        if config.top_k == FULL_RANKING:
            raise FeatureInputError(
                "a loaded index returns each query's top k: set --top_k > 0 with --index_dir."
            )
        k = min(config.top_k, index.size)
        ids, scores = index.search(query_global, k)
        ranks = np.ascontiguousarray(ids.T)
        truncated = k < num_db or bool((ranks == MISSING_ID).any())
        return ranks, np.ascontiguousarray(scores.T), truncated
    if config.top_k == FULL_RANKING and config.search_method == "exact":
        if not normalized:
            query_global, db_global = (
                search.l2_normalize(query_global),
                search.l2_normalize(db_global),
            )
        ranks, by_id = search.full_ranking(query_global, db_global)
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
    significant_only: bool = False,
) -> np.ndarray:
    """Re-ranks the top ``config.shortlist_size`` of each column by RANSAC inliers.

    Args:
        ranks: int [R, num_queries] global ranking (full or truncated, -1 padding last).
        scores: float [R, num_queries] global similarities aligned with ``ranks``, or
            None: ties keep the order of ``ranks``.
        query_local: LocalFeatures of each query.
        db_local: LocalFeatures by database id (sequence or callable ``id -> LocalFeatures``).
        config: matching settings, shortlist size, workers.
        binary: packed-bit descriptors (DELG*).
        progress: optional iterator wrapper (tqdm).
        significant_only: count inliers only when significant for the pair
            (:func:`delg_tf.retrieval.significance.rerank_query_significant`).

    Returns:
        int64 [R, num_queries] re-ranked ranking (entries after the shortlist unchanged).
    """
    from delg_tf.retrieval.significance import rerank_query_significant

    out = ranks.copy()
    queries = range(ranks.shape[1])
    matching = dataclasses.replace(config.matching, binary_descriptors=binary)
    with Reranker(matching, config.shortlist_size, config.num_workers) as reranker:
        for q in progress(queries) if progress else queries:
            valid = int(np.count_nonzero(ranks[:, q] != MISSING_ID))
            column = None if scores is None else scores[:valid, q]
            if significant_only:
                result = rerank_query_significant(
                    reranker, query_local[q], ranks[:valid, q], db_local, column
                )
            else:
                result = reranker.rerank_query(query_local[q], ranks[:valid, q], db_local, column)
            out[:valid, q] = result.ranking
    return out


@dataclasses.dataclass
class PostprocessedRanking:
    """Result of :func:`postprocess`.

    Attributes:
        ranks: int [R, num_queries] the final ranking.
        expanded: (ranks, scores, truncated) of the global search after DBA / alphaQE,
            or None when neither ran.
        superglobal: the SuperGlobal ranking of ``superglobal+ransac`` before RANSAC
            (None otherwise).
        reranked: the re-ranker's output (None when no re-ranker ran).
        skipped: stages the config asked for that could not run, with the reason.
    """

    ranks: np.ndarray
    expanded: Optional[tuple] = None
    superglobal: Optional[np.ndarray] = None
    reranked: Optional[np.ndarray] = None
    skipped: list = dataclasses.field(default_factory=list)


def postprocess(
    ranks: np.ndarray,
    scores: np.ndarray,
    db_global: np.ndarray,
    query_global: np.ndarray,
    config: EvaluateConfig,
    query_local: Optional[Sequence[LocalFeatures]] = None,
    db_local=None,
    binary: bool = False,
    progress: Optional[Callable] = None,
    timer: Optional[StageTimer] = None,
    index=None,
) -> PostprocessedRanking:
    """DBA and alphaQE, then the re-ranker, on the global ranking (``ranks``, ``scores``).

    1. DBA / alphaQE (:func:`expand_descriptors`) and a new global search with the
       expanded descriptors (:func:`global_ranking`, same ``search_method`` and
       ``top_k``); skipped when both are off.
    2. ``config.rerank``: ``ransac`` (:func:`rerank_ranking`, ties by the global
       similarity), ``superglobal`` (:func:`superglobal_ranking`),
       ``superglobal+ransac`` (SuperGlobal of the top ``superglobal_m``, then RANSAC
       of the top ``shortlist_size`` of that, ties in SuperGlobal order),
       ``diffusion`` (:func:`diffusion_ranking`) or ``ransac_fused`` (RANSAC with
       significant inliers only). SuperGlobal and diffusion use the descriptors of
       step 1. RANSAC stages need local features and ``shortlist_size`` > 0; without
       them they are skipped (listed in ``skipped``).

    Args:
        ranks: int [R, num_queries] global ranking of :func:`global_ranking`.
        scores: float [R, num_queries] its similarities.
        db_global: float [num_db, D] database descriptors (as given to the search).
        query_global: float [num_queries, D].
        config: the post-processing settings (see :class:`EvaluateConfig`).
        query_local: LocalFeatures of each query (None: no RANSAC).
        db_local: LocalFeatures by database id (sequence or callable), or None.
        binary: packed-bit local descriptors (DELG*).
        progress: optional iterator wrapper over queries (RANSAC).
        timer: records every stage (:data:`STAGE_DBA` ... :data:`STAGE_DIFFUSION`).
        index: the loaded index of :func:`global_ranking`, searched again with the
            alphaQE queries (DBA is refused with one: it changes the database side).

    Returns:
        PostprocessedRanking.
    """
    timer = timer if timer is not None else StageTimer(len(query_global))
    out = PostprocessedRanking(ranks)
    database, queries, normalized = db_global, query_global, False
    if config.dba != DBA_OFF or config.query_expansion == QUERY_EXPANSION_AQE:
        database, queries = expand_descriptors(db_global, query_global, config, timer)
        normalized = True
        if index is not None and config.dba != DBA_OFF:
            raise FeatureInputError(
                "--dba changes the database descriptors, a loaded index holds the original "
                "ones: drop --index_dir or --dba."
            )
        ranks, scores, truncated = timer.run(
            STAGE_SEARCH_EXPANDED,
            global_ranking,
            database,
            queries,
            config,
            normalized=True,
            index=index,
        )
        out.expanded = (ranks, scores, truncated)
        out.ranks = ranks
    has_local = db_local is not None and query_local is not None and config.shortlist_size > 0
    rerank_scores = scores
    if config.rerank in SUPERGLOBAL_RERANKERS:
        from delg_tf.retrieval import superglobal as sg

        graph = None  # offline neighbour lists when cheaper than the per-query Gram matrices
        if sg.graph_is_cheaper(len(database), len(queries), config.superglobal_m):
            k, beta = config.superglobal_k, config.superglobal_beta
            graph = timer.run(
                STAGE_SUPERGLOBAL_GRAPH,
                sg.build_neighbor_graph,
                database,
                normalized=normalized,
                num_neighbors=k,
                beta=beta,
            )
        ranks = timer.run(
            STAGE_SUPERGLOBAL,
            superglobal_ranking,
            ranks,
            database,
            queries,
            config,
            normalized,
            graph,
        )
        out.ranks = out.reranked = ranks
        rerank_scores = None  # RANSAC ties keep the SuperGlobal order.
        if config.rerank == RERANK_SUPERGLOBAL_RANSAC:
            out.superglobal = ranks
    elif config.rerank == RERANK_DIFFUSION:
        if not normalized:
            database, queries = search.l2_normalize(database), search.l2_normalize(queries)
        ranks = diffusion_ranking(database, queries, ranks, config, timer)
        out.ranks = out.reranked = ranks
    if config.uses_ransac:
        if not has_local:
            out.skipped.append(
                f"{config.rerank}: no local features (or shortlist_size=0); RANSAC not run"
            )
        else:
            stage = STAGE_RANSAC_FUSED if config.rerank == RERANK_RANSAC_FUSED else STAGE_RANSAC
            ranks = timer.run(
                stage,
                rerank_ranking,
                ranks,
                rerank_scores,
                query_local,
                db_local,
                config,
                binary,
                progress=progress,
                significant_only=config.rerank == RERANK_RANSAC_FUSED,
            )
            out.ranks = out.reranked = ranks
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
    index=None,
) -> FeaturesEvaluation:
    """Global-only vs post-processed (DBA, alphaQE, re-ranking) revisitop evaluation.

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
        output_json: if given, the JSON ``{"global": {...}, "expanded": {...},
            "superglobal": {...}, "reranked": {...}, "ranking": {...},
            "postprocessing": {...}, "config": {...}, "timings": {...}}`` is written
            there: ``global`` = the search with the descriptors as given, ``expanded``
            = after DBA / alphaQE (when on), ``superglobal`` = the SuperGlobal stage of
            ``superglobal+ransac``, ``reranked`` = after ``config.rerank`` (when a
            re-ranker ran); ``postprocessing`` = :meth:`EvaluateConfig.postprocessing_record`
            plus ``stages`` (``[{"stage", "seconds", "ms_per_query", "offline"}]`` in run
            order) and ``skipped``.
        progress: optional iterator wrapper (e.g. tqdm) over queries.
        verbose: print the results table.
        extra_json: more top-level entries for the JSON (e.g. dataset, failed images).
        index: optional index loaded from disk (:func:`open_index`) searched instead
            of ``config.search_method`` (see :func:`global_ranking`).

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
    if (
        rerank
        and config.uses_ransac
        and (num_db_local != db_global.shape[0] or len(query_local) != len(gnd))
    ):
        raise FeatureInputError(
            f"need one LocalFeatures per image: got {num_db_local} database (expected "
            f"{db_global.shape[0]}) and {len(query_local)} queries (expected {len(gnd)})."
        )
    timer = StageTimer(len(gnd))
    ranks, scores, truncated = timer.run(
        STAGE_SEARCH, global_ranking, db_global, query_global, config, index=index
    )
    results = {"global": evaluate_revisitop(ranks, gnd, config.kappas)}
    post = postprocess(
        ranks,
        scores,
        db_global,
        query_global,
        config,
        query_local if rerank else None,
        db_local if rerank else None,
        binary,
        progress=progress,
        timer=timer,
        index=index,
    )
    ranked = ranks
    if post.expanded is not None:
        ranked, _, truncated = post.expanded
        results["expanded"] = evaluate_revisitop(ranked, gnd, config.kappas)
    if post.superglobal is not None:
        results["superglobal"] = evaluate_revisitop(post.superglobal, gnd, config.kappas)
    if post.reranked is not None:
        results["reranked"] = evaluate_revisitop(post.reranked, gnd, config.kappas)
    timings = {f"{name}_s": seconds for name, seconds in timer.seconds.items()}
    timings["global_search_s"] = timer.seconds[STAGE_SEARCH]
    rerank_seconds = [timer.seconds[n] for n in RERANK_STAGES if n in timer.seconds]
    if rerank_seconds:
        timings["rerank_s"] = float(sum(rerank_seconds))
    postprocessing = {
        **config.postprocessing_record(),
        "stages": timer.record(),
        "skipped": post.skipped,
    }
    if verbose:
        print(format_results_table(results, config.kappas))
        if truncated:
            print(
                f"(ranking truncated to the global top {ranked.shape[0]} of "
                f"{db_global.shape[0]}: positives beyond it count as not retrieved)"
            )
        print(format_stages(postprocessing))
    ranking_info = {
        "search_method": config.search_method,
        "rows": int(ranked.shape[0]),
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
                "postprocessing": postprocessing,
                "config": config.record(),
                "timings": timings,
            },
            output_json,
        )
    return FeaturesEvaluation(
        ranks,
        post.reranked,
        results,
        timings,
        scores,
        truncated,
        ranking_info,
        expanded_ranks=None if post.expanded is None else post.expanded[0],
        superglobal_ranks=post.superglobal,
        postprocessing=postprocessing,
    )


def format_stages(postprocessing: Mapping) -> str:
    """One line: the stages that ran with their ms/query (offline ones marked)."""
    parts = [
        f"{stage['stage']} {stage['ms_per_query']:.3g}" + (" (offline)" if stage["offline"] else "")
        for stage in postprocessing["stages"]
    ]
    line = "ms/query: " + ", ".join(parts)
    for note in postprocessing.get("skipped", []):
        line += f"\nskipped: {note}"
    return line


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
    db_names: Optional[Sequence[str]] = None,
) -> FeaturesEvaluation:
    """:func:`evaluate_features` on opened stores; database local features read on demand.

    With ``config.index_dir`` the global search is that index (:func:`open_index`,
    aligned with ``db_names``, the database list ``db`` was opened with).
    """
    index = None
    if config.index_dir:
        if db_names is None:
            raise FeatureInputError("--index_dir needs the database names the store was read with.")
        index = open_index(config.index_dir, db_names, db.global_.shape[1], db.missing)
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
        index=index,
    )


def open_index(index_dir, db_names: Sequence[str], dim: int, missing: Sequence[str] = ()):
    """The index folder of ``python -m delg_tf.index``, with ids = positions in ``db_names``.

    Args:
        index_dir: the index folder (``--index_dir``).
        db_names: database names in dataset order (revisitop ``imlist``, then the
            distractors).
        dim: descriptor dimension of the evaluated features (the queries').
        missing: names without features (failed extractions): not required in the
            index, never retrieved.

    Returns:
        :class:`~delg_tf.retrieval.index.AlignedIndex`.

    Raises:
        IndexLoadError: see :func:`~delg_tf.retrieval.index.load_index`; a database
            image is not in the index.
    """
    from delg_tf.retrieval.index import load_index

    return load_index(index_dir, dim=dim).aligned(
        db_names, what=f"the database list ({len(db_names)} images)", missing=missing
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
    with (
        StoreFeatures(db_store, cfg["imlist"], binary, what="--db_features") as db,
        StoreFeatures(query_store, cfg["qimlist"], binary, what="--query_features") as queries,
    ):
        evaluate_store_features(
            cfg["gnd"], db, queries, config, output_json, progress, db_names=cfg["imlist"]
        )
    return Path(output_json)
