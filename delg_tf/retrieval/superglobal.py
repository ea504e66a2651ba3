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
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

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
        shortlist: float32 [M, D] descriptors d_1..d_M, L2-normalised rows.
        num_neighbors: K >= 0 (0 returns the shortlist unchanged).
        beta: neighbour weight factor (paper: 0.15).

    Returns:
        float32 [M, D] refined descriptors d' (weighted means, not unit length).
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

    Args:
        query: float32 [D] q, unit length.
        shortlist: float32 [M, D] its top-M database descriptors, unit rows, M >= 1.
        num_neighbors: K.
        beta: neighbour weight factor.

    Returns:
        (final float32 [M], refined float32 [M]): S_i and r_i = q . d'_i, both in
        the row order of ``shortlist``.
    """
    refined = refine_shortlist(shortlist, num_neighbors, beta)
    refined_scores = refined @ query
    expanded = expand_query(refined, refined_scores, num_neighbors)
    final = SCORE_AVERAGE * (refined_scores + refined @ expanded)
    return final.astype(np.float32), refined_scores.astype(np.float32)


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
