"""SuperGlobal re-ranking with global descriptors only (MDescAug + RerankwMDA).

Shao, Chen, Karpur, Cui, Araujo, Cao, "Global Features are All You Need for
Image Retrieval and Reranking", ICCV 2023 (reranking); defaults M = 400, K = 9,
beta = 0.15 (those of the code). For one query q (all descriptors L2-normalised) with its
global shortlist d_1..d_M (the top M of the initial ranking):

1. Refinement (MDescAug), inside the shortlist only:
       d'_i = (d_i + sum_{j in N_K(i)} beta s_ij d_j) / (1 + sum_{j in N_K(i)} beta s_ij)
   s_ij = d_i . d_j and N_K(i) the K shortlisted images most similar to d_i,
   d_i itself excluded (it enters with weight 1). d'_i is NOT re-normalised.
2. Refined similarity r_i = q . d'_i, and the shortlist order by decreasing r.
3. Query expansion (RerankwMDA): q' = element-wise max of the K + 1 refined
   descriptors with the largest r (the query itself is not in the max, no
   weights, no normalisation).
4. Final score S_i = (r_i + q' . d'_i) / 2; the shortlist is sorted by S, the
   images after the shortlist keep their initial order.

These details are those of the authors' code (``modules/reranking/MDescAug.py``
and ``RerankwMDA.py``, github.com/ShihaoShao-GH/SuperGlobal, commit 6db11a7), in
particular: the neighbours are searched among the top-M images of that query
(so d'_i depends on the query); the weights are beta * s_ij (not a power); the
normalisation is by the weight sum, not an L2 norm; the max of step 3 takes
K + 1 descriptors (``self.K = K + 1`` in RerankwMDA too); RerankwMDA also computes
beta-weighted similarities of those K + 1 descriptors but never uses them, so
the max is unweighted. Differences from that code, all deterministic choices
where it is not:

* the code takes the K + 1 most similar shortlisted images *including* the
  image itself and gives weight 1 to the first; here the image itself always
  gets weight 1 and its K most similar *other* images the beta weights. For
  L2-normalised descriptors s_ii = 1 is the maximum, so both agree except when
  rounding ranks an exact duplicate first (same vector, same result);
* ties (torch.argsort is not stable in the code) are broken by position: among
  neighbours by initial shortlist position, in step 2 by initial position, in
  step 4 by the step-2 order.

numpy only. The per-query cost is O(M^2 D) for the shortlist Gram matrix plus
O(M^2 log M) for the neighbour sort; memory O(M^2 + M D).

Fast path (:func:`build_neighbor_graph` offline, :func:`superglobal_rerank_graph`
online, numpy + scipy.sparse): the same ranking without any shortlist Gram matrix.

* Offline, once per database (:func:`build_neighbor_graph`, O(N^2 D), used by the
  evaluation only when that costs no more than the reference's per-query Gram
  matrices, :func:`graph_is_cheaper`): every database image's L most similar other
  database images with their similarities (exact float64 brute force in chunks, ties
  by increasing id), ``tail``, the similarity of its (L + 1)-th (an upper bound for
  every image outside its list; -inf when the list holds all N - 1 others), the
  L2-normalised rows in float64 and, for the K and beta to come, the sparse
  refinement matrix of stage 1 below.
* Linearity: with c_i = 1 + sum_j beta s_ij, q . d'_i = (q . d_i + sum_j beta s_ij q . d_j)
  / c_i and likewise q' . d'_i, so only the similarities of q and q' to the
  shortlisted images are needed (two matrix products with the union of the batch's
  shortlists, all queries of a batch at once); refined descriptors are formed for the
  K + 1 images of q' only.
* Neighbours inside the shortlist, certified from the graph, in three stages per
  shortlisted image d_i of a query:
  1. its first K list members are all in the shortlist and s_iK > s_i(K+1) (the next
     list entry, or ``tail``): then they are the K most similar shortlisted images,
     whatever the order of ties among them, and d'_i is the same for every query
     (one sparse product for all of them);
  2. otherwise its first K list members that are in the shortlist, looking at the
     first 2K list entries and then at all L, when at least K are found and the K-th
     of them is strictly more similar than the next shortlisted one in that window
     and than every image after it (the next list similarity, or ``tail``): no
     shortlisted image outside the window, and no tie, can change the set;
  3. otherwise the exact computation of that row (d_i . shortlist, stable sort: ties
     by shortlist position, as in :func:`refine_shortlist`).
  Only the neighbour *set* matters (the weighted sum does not depend on the order),
  and a tie at the K-th place always goes to stage 3, so the tie rules are those of
  the module docstring.
* The top K + 1 of step 3 are selected with ties by shortlist position (partition,
  then positions when the (K + 1)-th place is shared), the final order is
  lexicographic on (-S, -r, position), which is what :func:`rerank_shortlist`
  computes (one integer sort of the high bits of -S with the position; rows where two
  keys share those bits are sorted again exactly).

Exactness: both :func:`superglobal_scores` (the per-query reference) and the fast
path compute in float64 from the same L2-normalised float32 rows (those of
:func:`~delg_tf.retrieval.search.l2_normalize`), in a different order of
operations (the fast path's similarities come from other matrix products), so
their scores differ by float64 rounding (~1e-16) and their rankings are identical
unless two decisions (the K-th neighbour, the (K + 1)-th refined score, the final
order) are within that rounding of each other without being exactly equal; exact
ties, such as those between bit-identical descriptors (duplicates), resolve by the
same position rules. tests/test_retrieval_superglobal.py checks the fast path
against the reference and the float64 transcription of the authors' code on random
data and on data of exact duplicates (tied neighbours and scores), with truncated
rankings, M larger than the database, K = 0 and every stage exercised. (A float32
computation would differ from both at near-ties of ~1e-7.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Callable, Optional, Tuple

import numpy as np
import scipy.sparse

from delg_tf.retrieval.query_expansion import (
    check_normalized,
    check_same_dim,
    ranking_from_scores,
)
from delg_tf.retrieval.search import SearchError

DEFAULT_TOP_M = 400  # shortlist size M (paper and reference code).
DEFAULT_NUM_NEIGHBORS = 9  # K neighbours besides the image itself (code: self.K = K + 1).
DEFAULT_BETA = 0.15  # neighbour weight factor.
SELF_WEIGHT = 1.0  # weight of d_i in its own refinement.
SCORE_AVERAGE = 0.5  # final score = mean of the two similarities.
DEFAULT_LIST_SIZE = 32  # L: offline neighbours kept per database image (>= K).
GRAPH_CHUNK_SIZE = 1024  # database rows per offline matrix product.
BATCH_ELEMENTS = 1 << 21  # online: queries x union-of-shortlists entries per batch.
SINGLE_THREAD_MACS = 1 << 24  # online products below this run on one BLAS thread.
MISSING_ID = -1  # padding of truncated rankings (faiss).
NORM_EPS = 1e-12  # as delg_tf.retrieval.search.l2_normalize: zero rows stay zero.


def _check_count(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise SearchError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def refine_shortlist(
    shortlist: np.ndarray,
    num_neighbors: int = DEFAULT_NUM_NEIGHBORS,
    beta: float = DEFAULT_BETA,
) -> np.ndarray:
    """MDescAug: d'_i = (d_i + sum_j beta s_ij d_j) / (1 + sum_j beta s_ij), j in N_K(i).

    N_K(i): the K other shortlist rows most similar to d_i (ties by row order),
    K clipped to M - 1. Shao et al. ICCV 2023, reference ``MDescAug.py``.

    Cost: O(M^2 D + M^2 log M).

    Args:
        shortlist: float [M, D] descriptors d_1..d_M, L2-normalised rows.
        num_neighbors: K >= 0 (0 returns the shortlist unchanged).
        beta: neighbour weight factor (paper: 0.15).

    Returns:
        [M, D] refined descriptors d' (weighted means, not unit length), the dtype
        of ``shortlist``.
    """
    size = shortlist.shape[0]
    k = min(num_neighbors, size - 1)
    if k <= 0:
        return shortlist.copy()
    gram = shortlist @ shortlist.T
    np.fill_diagonal(gram, -np.inf)  # the image itself is added with SELF_WEIGHT.
    neighbors = np.argsort(-gram, axis=1, kind="stable")[:, :k]
    weights = beta * np.take_along_axis(gram, neighbors, axis=1)
    total = SELF_WEIGHT * shortlist + np.einsum("mk,mkd->md", weights, shortlist[neighbors])
    return total / (SELF_WEIGHT + weights.sum(axis=1, keepdims=True))


def expand_query(
    refined: np.ndarray, refined_scores: np.ndarray, num_neighbors: int = DEFAULT_NUM_NEIGHBORS
) -> np.ndarray:
    """RerankwMDA's expanded query q' = max over the K + 1 best refined descriptors.

    Args:
        refined: float [M, D] refined shortlist d'.
        refined_scores: float [M] r_i = q . d'_i.
        num_neighbors: K (K + 1 descriptors, clipped to M, enter the max).

    Returns:
        float [D] element-wise maximum (not normalised).
    """
    order = np.argsort(-refined_scores, kind="stable")[: num_neighbors + 1]
    return refined[order].max(axis=0)


def superglobal_scores(
    query: np.ndarray,
    shortlist: np.ndarray,
    num_neighbors: int = DEFAULT_NUM_NEIGHBORS,
    beta: float = DEFAULT_BETA,
) -> Tuple[np.ndarray, np.ndarray]:
    """Final SuperGlobal scores S_i = (q . d'_i + q' . d'_i) / 2 of one shortlist.

    Computed in float64 (the float32 inputs are exact in it), so the ranking is that
    of exact arithmetic unless two decisions are within ~1e-15.

    Args:
        query: float [D] q, unit length.
        shortlist: float [M, D] its top-M database descriptors, unit rows, M >= 1.
        num_neighbors: K.
        beta: neighbour weight factor.

    Returns:
        (final float64 [M], refined float64 [M]): S_i and r_i = q . d'_i, both in
        the row order of ``shortlist``.
    """
    shortlist = np.asarray(shortlist, dtype=np.float64)
    refined = refine_shortlist(shortlist, num_neighbors, beta)
    refined_scores = refined @ np.asarray(query, dtype=np.float64)
    expanded = expand_query(refined, refined_scores, num_neighbors)
    final = SCORE_AVERAGE * (refined_scores + refined @ expanded)
    return final, refined_scores


def rerank_shortlist(final: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """Shortlist positions by decreasing final score, ties by the refined order.

    The refined order is by decreasing r, ties by shortlist position (the code
    sorts positions already in refined order by the final score).

    Args:
        final: float [M] S_i.
        refined: float [M] r_i.

    Returns:
        int64 [M] permutation of the shortlist positions, best first.
    """
    by_refined = np.argsort(-refined, kind="stable")
    return by_refined[np.argsort(-final[by_refined], kind="stable")].astype(np.int64)


def _check_ranks(ranks: np.ndarray, num_db: int, num_q: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != num_q or not np.issubdtype(ranks.dtype, np.integer):
        raise SearchError(
            f"ranks must be an integer array [R, Q] (revisitop layout, one column per query, "
            f"Q = {num_q}), got {ranks.dtype} {ranks.shape}; transpose search ids [Q, R]."
        )
    if ranks.size and (ranks.min() < 0 or ranks.max() >= num_db):
        raise SearchError(
            f"ranks hold database ids in [0, {num_db}), got values in "
            f"[{ranks.min()}, {ranks.max()}]; missing results (-1) must be removed first."
        )
    return ranks.astype(np.int64)


def superglobal_rerank(
    queries: np.ndarray,
    database: np.ndarray,
    top_m: int = DEFAULT_TOP_M,
    num_neighbors: int = DEFAULT_NUM_NEIGHBORS,
    beta: float = DEFAULT_BETA,
    ranks: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Re-ranks the top M of each query's ranking with SuperGlobal (module docstring).

    Cost: O(Q N D) for the initial ranking when ``ranks`` is None, plus
    O(Q (M^2 D + M^2 log M)).

    Args:
        queries: float [Q, D], L2-normalised rows.
        database: float [N, D], L2-normalised rows.
        top_m: shortlist size M >= 0 (0 = unchanged; clipped to the ranking length).
        num_neighbors: K >= 0.
        beta: neighbour weight factor >= 0.
        ranks: optional int [R, Q] initial ranking (revisitop layout, R <= N, e.g.
            a transposed top-R search); default: the full cosine ranking, ties by
            increasing database id.

    Returns:
        (ranks int64 [R, Q], shortlist_scores float32 [M', Q]): the re-ranked
        shortlist followed by the rest of the initial ranking unchanged;
        ``shortlist_scores[r, q]`` is the final score of ``ranks[r, q]``
        (M' = min(M, R)).
    """
    queries = check_normalized("queries", queries)
    database = check_normalized("database", database)
    check_same_dim(queries, database)
    top_m = _check_count("top_m", top_m)
    num_neighbors = _check_count("num_neighbors", num_neighbors)
    if beta < 0:
        raise SearchError(f"beta must be >= 0, got {beta}.")
    if ranks is None:
        ranks = ranking_from_scores(database @ queries.T)
    ranks = _check_ranks(ranks, database.shape[0], queries.shape[0]).copy()
    size = min(top_m, ranks.shape[0])
    scores = np.zeros((size, queries.shape[0]), dtype=np.float32)
    if size == 0:
        return ranks, scores
    for q in range(queries.shape[0]):
        shortlist_ids = ranks[:size, q].copy()
        final, refined = superglobal_scores(
            queries[q], database[shortlist_ids], num_neighbors, beta
        )
        order = rerank_shortlist(final, refined)
        ranks[:size, q] = shortlist_ids[order]
        scores[:, q] = final[order]
    return ranks, scores


class _Buffers(threading.local):
    """Work arrays of the online re-ranking, reused across calls (one set per thread):
    fresh arrays of this size cost page faults on every call.
    """

    def __init__(self):
        self.arrays = {}

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        array = self.arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self.arrays[name] = np.empty(shape, dtype=dtype)
        return array


@dataclasses.dataclass(frozen=True)
class NeighborGraph:
    """Offline database-side neighbour lists of :func:`superglobal_rerank_graph`.

    Attributes:
        ids: int32 [N, L'] the L' = min(L, N - 1) most similar other database images of
            each image, by decreasing similarity, ties by increasing id.
        sims: float64 [N, L'] their similarities (of the L2-normalised rows).
        tail: float64 [N] the similarity of the (L' + 1)-th most similar image, an upper
            bound for every image outside the list (-inf when it holds all N - 1 others).
        unit: float64 [N, D] the rows L2-normalised exactly as
            :func:`~delg_tf.retrieval.search.l2_normalize` (float32 division, then
            widened; the rows as given when declared normalised): the online
            re-ranking reads its shortlisted rows here (an offline copy, like DBA's
            augmented database; N is small whenever the graph pays off, see
            :func:`graph_is_cheaper`).
    """

    ids: np.ndarray
    sims: np.ndarray
    tail: np.ndarray
    unit: np.ndarray
    _matrices: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _buffers: "_Buffers" = dataclasses.field(
        default_factory=lambda: _Buffers(), compare=False, repr=False
    )

    @property
    def num_db(self) -> int:
        return int(self.ids.shape[0])

    @property
    def list_size(self) -> int:
        return int(self.ids.shape[1])

    def unit_rows(self, ids: Optional[np.ndarray] = None) -> np.ndarray:
        """float64 [len(ids), D]: the normalised rows ``ids`` (None: all, no copy)."""
        return self.unit if ids is None else np.take(self.unit, ids, axis=0)

    def prepare(self, num_neighbors: int, beta: float) -> None:
        """Builds (offline) the sparse refinement of the whole database for K, beta.

        That is the stage-1 matrix of :func:`_refinement` and the refined descriptor
        of every image with its first K list members (``refine @ unit``).
        :func:`superglobal_rerank_graph` uses them for every batch whose shortlists
        cover the whole database; other batches build the part they need online.

        Args:
            num_neighbors: K.
            beta: neighbour weight factor.
        """
        _blas_controller()  # the one-time scan of the loaded BLAS libraries, offline.
        key = (int(num_neighbors), float(beta))
        if key[0] > 0 and key not in self._matrices:
            first = self.ids[:, : key[0]].astype(np.int64)
            refine, adjacency, full = _refinement(self, np.arange(self.num_db), first, *key)
            padded = np.vstack([self.unit, np.zeros((1, self.unit.shape[1]))])
            self._matrices[key] = (refine, adjacency, full, refine @ padded)


def build_neighbor_graph(
    database: np.ndarray,
    list_size: int = DEFAULT_LIST_SIZE,
    normalized: bool = False,
    chunk_size: int = GRAPH_CHUNK_SIZE,
    num_neighbors: Optional[int] = None,
    beta: float = DEFAULT_BETA,
) -> NeighborGraph:
    """Offline top-L neighbour lists of every database image (brute force, exact).

    Database side of the fast SuperGlobal path (module docstring); like DBA's
    neighbour search it costs O(N^2 D) once per database (float64 products of
    ``chunk_size`` rows with all N), memory O(N (L + D) + chunk_size N).

    Args:
        database: float [N, D] descriptors (rows L2-normalised when ``normalized``,
            else normalised here as :func:`~delg_tf.retrieval.search.l2_normalize`).
        list_size: L >= 1 neighbours kept per image (needs L >= K of the re-ranking;
            a longer list lets more rows skip the exact fallback).
        normalized: the rows are unit length already.
        chunk_size: database rows per matrix product.
        num_neighbors: K of the re-ranking to come, if known: its sparse refinement
            of the whole database is built here too (:meth:`NeighborGraph.prepare`).
        beta: neighbour weight factor of the re-ranking to come.

    Returns:
        NeighborGraph.
    """
    database = np.asarray(database, dtype=np.float32)
    if database.ndim != 2 or database.shape[0] == 0:
        raise SearchError(
            f"database must be a non-empty 2-D array [num_db, dim], got shape {database.shape}."
        )
    list_size = _check_count("list_size", list_size)
    chunk_size = _check_count("chunk_size", chunk_size)
    if list_size < 1 or chunk_size < 1:
        raise SearchError(
            f"list_size and chunk_size must be >= 1, got {list_size} and {chunk_size}."
        )
    num_db = database.shape[0]
    if normalized:
        norms = np.ones(num_db, dtype=np.float32)
    else:
        norms = np.maximum(np.linalg.norm(database, axis=1), np.float32(NORM_EPS))
    unit = (database / norms[:, None]).astype(np.float64)
    keep = min(list_size, num_db - 1)
    candidates = min(keep + 1, num_db - 1)  # the list and the tail bound.
    ids = np.zeros((num_db, keep), dtype=np.int32)
    sims = np.zeros((num_db, keep))
    tail = np.full(num_db, -np.inf)
    for start in range(0, num_db, chunk_size):
        block = unit[start : start + chunk_size] @ unit.T
        rows = np.arange(start, start + block.shape[0])
        block[rows - start, rows] = -np.inf  # the image itself.
        if candidates < num_db - 1:
            top = np.argpartition(-block, candidates - 1, axis=1)[:, :candidates]
        else:
            top = np.broadcast_to(np.arange(num_db), block.shape)
        values = np.take_along_axis(block, top, axis=1)
        order = np.lexsort((top, -values), axis=-1)[:, :candidates]
        top = np.take_along_axis(top, order, axis=1)
        values = np.take_along_axis(values, order, axis=1)
        ids[rows] = top[:, :keep]
        sims[rows] = values[:, :keep]
        if candidates > keep:
            tail[rows] = values[:, keep]
    graph = NeighborGraph(ids=ids, sims=sims, tail=tail, unit=unit)
    if num_neighbors is not None:
        graph.prepare(_check_count("num_neighbors", num_neighbors), beta)
    return graph


def graph_is_cheaper(num_db: int, num_queries: int, top_m: int = DEFAULT_TOP_M) -> bool:
    """Whether the offline graph (N^2 similarities) costs no more than the reference's
    per-query shortlist Gram matrices (Q M^2), i.e. N^2 <= Q min(M, N)^2.

    Args:
        num_db: N.
        num_queries: Q.
        top_m: M.

    Returns:
        bool.
    """
    shortlist = min(top_m, num_db)
    return num_db * num_db <= num_queries * shortlist * shortlist


def _refinement(graph: NeighborGraph, union: np.ndarray, first: np.ndarray, k: int, beta: float):
    """Sparse MDescAug of the union's rows with their first K list members (stage 1).

    Row u of ``refine`` holds 1 / c_u at u and beta s_uj / c_u at its first K list
    members j (c_u = 1 + sum_j beta s_uj), so ``refine @ (x . d)`` = x . d' for every
    row whose neighbours in the shortlist are those K; row and column U are a dummy
    (padding). ``adjacency`` has a 1 at each of those members inside the union.

    Args:
        graph: NeighborGraph.
        union: int64 [U] database ids of the rows.
        first: int64 [U, K] union columns of their first K list members (-1 outside).
        k: K >= 1.
        beta: neighbour weight factor.

    Returns:
        (refine csr [U + 1, U + 1], adjacency csr [U + 1, U + 1], full bool [U + 1]:
        all K members in the union and s_uK > the next list similarity / tail).
    """
    size = union.size
    inside = first >= 0
    sims = graph.sims[union, :k]
    bound = graph.sims[union, k] if graph.list_size > k else graph.tail[union]
    full = np.zeros(size + 1, dtype=bool)
    full[:size] = np.all(inside, axis=1) & (sims[:, k - 1] > bound)
    weights = np.where(inside, beta * sims, 0.0)
    norm = SELF_WEIGHT + beta * sims.sum(axis=1, keepdims=True)
    indices = np.full((size + 1, k + 1), size, dtype=np.int64)
    indices[:size, 0] = np.arange(size)
    indices[:size, 1:] = np.where(inside, first, size)
    data = np.zeros((size + 1, k + 1))
    data[:size, :1] = SELF_WEIGHT / norm
    data[:size, 1:] = weights / norm
    ones = np.zeros((size + 1, k + 1), dtype=np.float32)
    ones[:size, 1:] = inside
    indptr = np.arange(0, indices.size + 1, k + 1)
    shape = (size + 1, size + 1)
    refine = scipy.sparse.csr_matrix((data.ravel(), indices.ravel(), indptr), shape=shape)
    adjacency = scipy.sparse.csr_matrix((ones.ravel(), indices.ravel(), indptr), shape=shape)
    return refine, adjacency, full


def _batch_rerank(
    queries: np.ndarray,
    ids: np.ndarray,
    graph: NeighborGraph,
    num_neighbors: int,
    beta: float,
    inverse: np.ndarray,
    stats: dict,
) -> Tuple[np.ndarray, np.ndarray]:
    """Fast SuperGlobal of a batch of c queries whose shortlists have M_q > K rows.

    Args:
        queries: float64 [c, D] unit rows.
        ids: int [c, Mx] shortlists (database ids), padded with -1 after M_q.
        graph: the database's NeighborGraph.
        num_neighbors: K.
        beta: neighbour weight factor.
        inverse: int [N + 1] all -1; holds the column of each database id in the
            union U of the batch's shortlists while this runs (U at index N, the
            padding's dummy column), all -1 again on return.
        stats: counts of shortlist rows per stage, updated.

    Returns:
        (order int64 [c, Mx]: shortlist positions, best first, padding last;
        final float64 [c, Mx]: S in that order, -inf for padding), both buffers of
        ``graph`` that the next batch overwrites.
    """
    k = num_neighbors
    buffer = graph._buffers.get
    count, width = ids.shape
    num_db = graph.num_db
    valid = ids >= 0
    num_valid = int(np.count_nonzero(valid))
    mark = np.zeros(num_db + 1, dtype=bool)
    mark[ids] = True  # padding -1 marks the dummy slot N
    mark[num_db] = False
    union = np.flatnonzero(mark)
    size = union.size
    inverse[union] = np.arange(size)
    inverse[num_db] = size
    try:
        cols = np.take(inverse, ids)  # union column of each shortlist row, padding -> U
        flat = cols * count + np.arange(count, dtype=cols.dtype)[:, None]  # into [U + 1, c]
        member = buffer("member", ((size + 1) * count,), np.float32)
        member.fill(0.0)
        member[flat] = 1.0
        member = member.reshape(size + 1, count)
        member[size] = 0.0
        if np.count_nonzero(member) != num_valid:
            raise SearchError(
                "ranks hold a database id twice in one query's shortlist; each column "
                "must be a ranking (distinct ids)."
            )
        rows_u = graph.unit_rows(None if size == num_db else union)
        sims_q = buffer("sims_q", (size + 1, count), np.float64)
        sims_q[size] = 0.0
        np.matmul(rows_u, queries.T, out=sims_q[:size])  # q . d of the union
        if k > 0:
            if size == num_db:
                graph.prepare(k, beta)
                refine, adjacency, full, descriptors = graph._matrices[(k, beta)]
            else:
                first = np.take(inverse, graph.ids[union, :k])
                refine, adjacency, full = _refinement(graph, union, first, k, beta)
                descriptors = None
            found_k = adjacency @ member  # graph neighbours in each shortlist, [U + 1, c]
            found_k[~full] = -1.0
            found_k[size] = k  # padding: nothing to do
            over = np.flatnonzero(np.take(found_k, flat) != k)
            refined = np.take(refine @ sims_q, flat, out=buffer("refined", flat.shape, np.float64))
        else:
            refine = descriptors = None
            over = np.zeros(0, dtype=np.int64)
            refined = np.take(sims_q, flat, out=buffer("refined", flat.shape, np.float64))
        stats["stage 1"] = stats.get("stage 1", 0) + num_valid - over.size
        oq, op = np.divmod(over, width)
        over_ids = np.zeros((over.size, k), dtype=np.int64)
        over_w = np.zeros((over.size, k))
        if over.size:
            _fill_uncertified(
                over,
                oq,
                op,
                ids,
                cols,
                member,
                rows_u,
                graph,
                k,
                beta,
                inverse,
                over_ids,
                over_w,
                stats,
            )
            own = np.take(cols, over)
            over_cols = np.take(inverse, over_ids)
            over_norm = SELF_WEIGHT + over_w.sum(axis=1)
            at_q = oq[:, None]
            refined.flat[over] = (
                np.take(sims_q, own * count + oq)
                + (over_w * np.take(sims_q, over_cols * count + at_q)).sum(axis=1)
            ) / over_norm
        if num_valid < refined.size:
            refined[~valid] = -np.inf
        expanded = _expanded_queries(
            refined, cols, refine, descriptors, over, over_ids, over_w, rows_u, k, inverse
        )
        sims_x = buffer("sims_x", (size + 1, count), np.float64)
        sims_x[size] = 0.0
        np.matmul(rows_u, expanded.T, out=sims_x[:size])  # q' . d of the union
        second = np.take(
            refine @ sims_x if k > 0 else sims_x, flat, out=buffer("second", flat.shape, np.float64)
        )
        if over.size:
            second.flat[over] = (
                np.take(sims_x, own * count + oq)
                + (over_w * np.take(sims_x, over_cols * count + at_q)).sum(axis=1)
            ) / over_norm
        final = np.add(refined, second, out=second)
        final *= SCORE_AVERAGE
        if num_valid < final.size:
            final[~valid] = -np.inf
        return _final_order(final, refined, buffer)
    finally:
        inverse[union] = MISSING_ID
        inverse[num_db] = MISSING_ID


def _final_order(
    final: np.ndarray, refined: np.ndarray, buffer: Callable
) -> Tuple[np.ndarray, np.ndarray]:
    """Positions by decreasing S, ties by decreasing r, then by position (as rerank_shortlist).

    One integer sort of keys that hold the high bits of -S (as order-preserving int64)
    above the position; a row where two consecutive keys share those high bits (an
    exact tie, or S within ~2^-43 relative) is sorted again exactly, lexicographically.

    Args:
        final: float64 [c, Mx] S (-inf padding).
        refined: float64 [c, Mx] r (-inf padding).
        buffer: ``NeighborGraph._buffers.get`` (reused arrays).

    Returns:
        (order int64 [c, Mx], final in that order), buffers.
    """
    count, width = final.shape
    bits = max(1, (width - 1).bit_length())
    keys = buffer("keys", final.shape, np.int64)
    np.negative(final, out=keys.view(np.float64))
    order = np.right_shift(keys, 63, out=buffer("order", final.shape, np.int64))
    order &= np.int64(0x7FFFFFFFFFFFFFFF)
    keys ^= order  # now the integer order is the float order of -S
    keys >>= bits
    keys <<= bits
    keys |= np.arange(width)
    keys.sort(axis=1)
    np.bitwise_and(keys, (1 << bits) - 1, out=order)
    base = np.arange(0, final.size, width)[:, None]
    order += base
    ranked = np.take(final, order, out=buffer("ranked", final.shape, np.float64))
    order -= base
    keys >>= bits
    ties = keys[:, 1:] == keys[:, :-1]
    if not np.isfinite(ranked[:, -1]).all():  # padding (-inf, sorted last) ties harmlessly
        ties &= np.isfinite(ranked[:, 1:])
    ties = ties.any(axis=1)
    if ties.any():
        order[ties] = np.lexsort((-refined[ties], -final[ties]), axis=-1)
        ranked[ties] = np.take_along_axis(final[ties], order[ties], axis=1)
    return order, ranked


def _fill_uncertified(
    over, oq, op, ids, cols, member, rows_u, graph, k, beta, inverse, over_ids, over_w, stats
):
    """Neighbours and weights of the rows stage 1 did not certify (stages 2 and 3).

    Args:
        over: int64 [n] flat index of each row in the [c, Mx] batch arrays.
        oq: int64 [n] its batch query.
        op: int64 [n] its shortlist position.
        ids: int [c, Mx] shortlists (database ids, -1 padding).
        cols: int [c, Mx] the same as columns of the union U.
        member: float32 [U + 1, c] 1 where a union image is in a query's shortlist.
        rows_u: float64 [U, D] the union's unit rows.
        graph: NeighborGraph.
        k: K >= 1.
        beta: neighbour weight factor.
        inverse: int [N + 1] union column of each database id (-1 outside).
        over_ids: int64 [n, K] filled in place: the K neighbours (database ids).
        over_w: float64 [n, K] filled in place: their weights beta * s.
        stats: counts of rows per stage, updated.
    """
    own = np.take(ids, over)
    ok = np.zeros(over.size, dtype=bool)
    window = min(2 * k, graph.list_size)  # a short window first, then the whole list
    for width in sorted({window, graph.list_size}):
        rows = np.flatnonzero(~ok)
        if rows.size == 0:
            break
        found, near, weights = _listed_neighbours(
            np.take(own, rows), np.take(oq, rows), member, graph, k, beta, inverse, width
        )
        ok[rows[found]] = True
        over_ids[rows[found]] = near
        over_w[rows[found]] = weights
    exact = np.flatnonzero(~ok)
    stats["stage 2"] = stats.get("stage 2", 0) + over.size - exact.size
    stats["stage 3"] = stats.get("stage 3", 0) + exact.size
    for q in np.unique(oq[exact]):
        rows = exact[oq[exact] == q]
        size = int(np.count_nonzero(ids[q] != MISSING_ID))
        shortlist = rows_u[cols[q, :size]]
        positions = op[rows]
        gram = shortlist[positions] @ shortlist.T
        gram[np.arange(positions.size), positions] = -np.inf
        nearest = np.argsort(-gram, axis=1, kind="stable")[:, :k]
        over_ids[rows] = ids[q, nearest]
        over_w[rows] = beta * np.take_along_axis(gram, nearest, axis=1)


def _listed_neighbours(own, oq, member, graph, k, beta, inverse, width):
    """Stage 2: the first K shortlisted images among the first ``width`` list entries.

    They are the K nearest shortlisted images when the K-th of them is strictly more
    similar than the next shortlisted one in the window and than every image after
    the window (the (width + 1)-th list similarity, or ``tail`` for the whole list).

    Args:
        own: int64 [n] database ids of the rows.
        oq: int64 [n] their batch query.
        member: float32 [U + 1, c] 1 where a union image is in a query's shortlist
            (row U all zero).
        graph: NeighborGraph.
        k: K >= 1.
        beta: neighbour weight factor.
        inverse: int [N + 1] union column of each database id (-1 outside).
        width: list entries looked at, K <= width <= L.

    Returns:
        (ok bool [n], neighbours int64 [n_ok, K] database ids, weights float64
        [n_ok, K] beta * s) for the rows certified.
    """
    listed = np.take(graph.ids, own, axis=0)[:, :width]
    listed_sims = np.ascontiguousarray(np.take(graph.sims, own, axis=0)[:, :width])
    if width < graph.list_size:
        bound = np.take(graph.sims[:, width], own)
    else:
        bound = np.take(graph.tail, own)
    listed_cols = np.take(inverse, listed)
    dummy = member.shape[0] - 1  # the zero row: not in any shortlist
    look = np.where(listed_cols >= 0, listed_cols, dummy) * member.shape[1] + oq[:, None]
    found = np.take(member, look) > 0
    running = np.cumsum(found.ravel()).reshape(found.shape)
    rank = running - (running[:, :1] - found[:, :1])  # found so far in each row
    total = rank[:, -1]
    base = np.arange(0, found.size, width)
    kth = np.take(listed_sims, base + np.argmax(rank >= k, axis=1))
    after = np.take(listed_sims, base + np.argmax(rank > k, axis=1))
    after[total <= k] = -np.inf
    ok = (total >= k) & (kth > bound) & (kth > after)
    chosen = found & (rank <= k)
    chosen[~ok] = False
    picked = np.flatnonzero(chosen)
    near = np.take(listed, picked).reshape(-1, k).astype(np.int64)
    return ok, near, beta * np.take(listed_sims, picked).reshape(-1, k)


def _top_positions(refined: np.ndarray, top: int) -> np.ndarray:
    """The ``top`` positions of each row with the largest r, ties by position.

    Args:
        refined: float64 [c, Mx] r (-inf padding), at least ``top`` finite per row.
        top: K + 1.

    Returns:
        int64 [c, top] positions (in no particular order).
    """
    count, width = refined.shape
    if width == top:
        return np.broadcast_to(np.arange(width), refined.shape)
    negated = -refined
    part = np.partition(negated, top, axis=1)
    worst = part[:, :top].max(axis=1)  # the (K + 1)-th largest r, negated
    tied = worst == part[:, top]
    chosen = np.flatnonzero(negated <= worst[:, None]) % width  # K + 1 per untied row
    if not tied.any():
        return chosen.reshape(count, top)
    # The (K + 1)-th place is shared: positions decide, as in expand_query.
    threshold = worst[:, None]
    above = negated < threshold
    equal = negated == threshold
    need = top - above.sum(axis=1, keepdims=True)
    take = above | (equal & (np.cumsum(equal, axis=1) <= need))
    return (np.flatnonzero(take) % width).reshape(count, top)


def _expanded_queries(
    refined, cols, refine, descriptors, over, over_ids, over_w, rows_u, k, inverse
):
    """The expanded query q' of each batch query: max of its K + 1 best refined rows.

    Ties at the (K + 1)-th place by shortlist position (as :func:`expand_query`).

    Args:
        refined: float64 [c, Mx] r, -inf for padding (M_q >= K + 1).
        cols: int [c, Mx] shortlists as union columns.
        refine: the batch's sparse refinement (:func:`_refinement`), None when K = 0.
        descriptors: float64 [U + 1, D] ``refine @ rows`` prepared offline (the
            refined descriptors of the stage-1 rows), or None.
        over: int64 [n] flat batch index of the rows stage 1 did not certify (sorted).
        over_ids: int64 [n, K] their neighbours (database ids).
        over_w: float64 [n, K] their weights.
        rows_u: float64 [U, D] unit rows of the union.
        k: K.
        inverse: int [N + 1] union column of each database id.

    Returns:
        float64 [c, D].
    """
    count, width = refined.shape
    top = k + 1
    chosen = (_top_positions(refined, top) + np.arange(0, refined.size, width)[:, None]).ravel()
    own = np.take(cols, chosen)
    if k == 0:
        return np.take(rows_u, own, axis=0).reshape(count, top, -1).max(axis=1)
    # Stage-1 rows: the prepared refinement rows; the others from their own lists.
    members = np.take(refine.indices.reshape(-1, top), own, axis=0)
    coef = np.take(refine.data.reshape(-1, top), own, axis=0)
    has = np.zeros(own.size, dtype=bool)
    if over.size:
        slot = np.searchsorted(over, chosen)
        has = (slot < over.size) & (np.take(over, np.minimum(slot, over.size - 1)) == chosen)
        weights = over_w[slot[has]]
        norm = SELF_WEIGHT + weights.sum(axis=1, keepdims=True)
        members[has, 1:] = np.take(inverse, over_ids[slot[has]])
        coef[has, :1] = SELF_WEIGHT / norm
        coef[has, 1:] = weights / norm
    if descriptors is None:
        vectors = _combine(coef, members, rows_u)
    else:
        vectors = np.take(descriptors, own, axis=0)
        if has.any():
            vectors[has] = _combine(coef[has], members[has], rows_u)
    return vectors.reshape(count, top, -1).max(axis=1)


def _combine(coef: np.ndarray, members: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 [n, D]: row i = sum_j coef[i, j] rows[members[i, j]] (one sparse product)."""
    indptr = np.arange(0, members.size + 1, members.shape[1])
    shape = (members.shape[0], rows.shape[0])
    return scipy.sparse.csr_matrix((coef.ravel(), members.ravel(), indptr), shape=shape) @ rows


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def superglobal_rerank_graph(
    queries: np.ndarray,
    database: np.ndarray,
    ranks: np.ndarray,
    graph: NeighborGraph,
    top_m: int = DEFAULT_TOP_M,
    num_neighbors: int = DEFAULT_NUM_NEIGHBORS,
    beta: float = DEFAULT_BETA,
    stats: Optional[dict] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """SuperGlobal re-ranking of every query at once with an offline neighbour graph.

    The ranking of :func:`superglobal_rerank` (module docstring: fast path, exactness)
    on the valid prefix of each column of ``ranks``, reading the shortlisted rows from
    the graph's normalised copy (``graph.unit``). Shortlists of at most K rows use
    :func:`superglobal_scores`. Not thread-safe per graph beyond its per-thread work
    arrays (each thread gets its own).

    Cost: per batch of c queries (:func:`_batch_size`) two matrix products with the
    union U of their shortlists, O(c U D), sparse products O(c U K), the final sorts
    O(c M log M), O(L) per row that stage 1 does not certify and O(M D) per row of
    stage 3; no O(M^2) term. Memory O(c U + U (L + D)). BLAS runs on one thread when
    a batch's products are small (waking a second one costs more than it saves).
    The returned arrays are new; the large work arrays are kept in the graph and
    reused by the next call (fresh ones would cost page faults on every call).

    Args:
        queries: float [Q, D], L2-normalised rows.
        database: float [N, D] the database the graph was built from (its shape is
            checked; its rows are read from ``graph.unit``).
        ranks: int [R, Q] initial ranking (revisitop layout), database ids; a column may
            end with -1 (missing results).
        graph: :func:`build_neighbor_graph` of ``database``.
        top_m: shortlist size M >= 0.
        num_neighbors: K >= 0, <= ``graph.list_size`` (or the lists hold every image).
        beta: neighbour weight factor >= 0.
        stats: optional dict, receives the number of shortlist rows whose neighbours
            came from ``"stage 1"``, ``"stage 2"``, ``"stage 3"`` and ``"small"``
            (shortlists of at most K rows).

    Returns:
        (ranks int64 [R, Q], shortlist_scores float32 [M', Q]) as
        :func:`superglobal_rerank` (M' = min(M, R)); scores after a column's valid
        shortlist are 0.
    """
    stats = {} if stats is None else stats
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or getattr(database, "ndim", 0) != 2:
        raise SearchError(
            f"queries and database must be 2-D [N, D], got {queries.shape} and "
            f"{getattr(database, 'shape', None)}."
        )
    check_same_dim(queries, database)
    if graph.num_db != database.shape[0]:
        raise SearchError(
            f"graph was built for {graph.num_db} database images, the database has "
            f"{database.shape[0]}; build_neighbor_graph(database) again."
        )
    top_m = _check_count("top_m", top_m)
    k = _check_count("num_neighbors", num_neighbors)
    if beta < 0:
        raise SearchError(f"beta must be >= 0, got {beta}.")
    if graph.list_size < min(k, graph.num_db - 1):
        raise SearchError(
            f"graph lists hold {graph.list_size} neighbours, num_neighbors={k} needs "
            f"at least {min(k, graph.num_db - 1)}; build_neighbor_graph(list_size=...)."
        )
    ranks = np.asarray(ranks)
    num_q = queries.shape[0]
    if ranks.ndim != 2 or ranks.shape[1] != num_q or not np.issubdtype(ranks.dtype, np.integer):
        raise SearchError(
            f"ranks must be an integer array [R, Q] (revisitop layout, one column per query, "
            f"Q = {num_q}), got {ranks.dtype} {ranks.shape}; transpose search ids [Q, R]."
        )
    out = ranks.astype(np.int64, copy=True)
    size = min(top_m, out.shape[0])
    scores = np.zeros((size, num_q), dtype=np.float32)
    if size == 0 or num_q == 0:
        return out, scores
    head = out[:size]
    low, high = int(head.min()), int(head.max())
    if low < MISSING_ID or high >= graph.num_db:
        raise SearchError(
            f"ranks must hold database ids in [0, {graph.num_db}) with missing results "
            f"(-1) only at the end of a column, got values in [{low}, {high}]."
        )
    sizes = np.full(num_q, size)
    if low == MISSING_ID:
        missing = head == MISSING_ID
        sizes -= np.count_nonzero(missing, axis=0)
        if np.any(missing != (np.arange(size)[:, None] >= sizes)):
            raise SearchError(
                f"ranks must hold database ids in [0, {graph.num_db}) with missing results "
                "(-1) only at the end of a column, got a -1 followed by an id."
            )
    for q in np.flatnonzero((sizes >= 1) & (sizes <= k)):
        shortlist_ids = head[: sizes[q], q].copy()
        final, refined = superglobal_scores(queries[q], graph.unit_rows(shortlist_ids), k, beta)
        order = rerank_shortlist(final, refined)
        out[: sizes[q], q] = shortlist_ids[order]
        scores[: sizes[q], q] = final[order]
        stats["small"] = stats.get("small", 0) + int(sizes[q])
    batched = np.flatnonzero(sizes > k)
    step = _batch_size(graph.num_db, size, batched.size)
    index = np.int32 if graph.num_db < np.iinfo(np.int32).max else np.int64
    inverse = np.full(graph.num_db + 1, MISSING_ID, dtype=index)
    small = step * min(graph.num_db, step * size) * queries.shape[1] <= SINGLE_THREAD_MACS
    with _blas_controller().limit(limits=1, user_api="blas") if small else contextlib.nullcontext():
        for start in range(0, batched.size, step):
            chunk = batched[start : start + step]
            width = int(sizes[chunk].max())
            shortlists = head[:width, chunk].T.astype(index)
            order, final = _batch_rerank(
                queries[chunk].astype(np.float64),
                shortlists,
                graph,
                k,
                beta,
                inverse,
                stats,
            )
            # Padding (-1, score -inf) sorts last, where the column holds -1 already.
            base = np.arange(0, shortlists.size, width)[:, None]
            out[:width, chunk] = np.take(shortlists, order + base).T
            scores[:width, chunk] = np.where(np.isfinite(final), final, 0.0).T
    return out, scores


def _batch_size(num_db: int, top_m: int, num_queries: int) -> int:
    """Queries per batch c: halved from all until c * min(N, c M) <= BATCH_ELEMENTS."""
    count = max(1, num_queries)
    while count > 1 and count * min(num_db, count * top_m) > BATCH_ELEMENTS:
        count = (count + 1) // 2
    return count
