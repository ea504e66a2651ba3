"""alpha-weighted query expansion (alphaQE) and database-side augmentation (DBA).

Both replace a descriptor by the L2-normalised sum of itself and its nearest
database neighbours, each neighbour weighted by its similarity raised to the
power alpha (alphaQE: Radenovic, Tolias, Chum, "Fine-tuning CNN Image Retrieval
with No Human Annotation", TPAMI 2018, alpha = 3; alpha = 0 is the average query
expansion of Chum et al. ICCV 2007; DBA: Arandjelovic & Zisserman CVPR 2012,
here with the same alpha weights, the "alphaDBA" form used with alphaQE):

    x_hat = normalise(x + sum_{i=1..n} max(s(x, x_i), 0)^alpha * x_i)

where x_1..x_n are the n database descriptors most similar to x (excluding x
itself for DBA) and s is the inner product. The descriptor itself enters with
weight s(x, x)^alpha = 1. Negative similarities get weight 0 (a negative number
to a non-integer power is undefined; the top neighbours of a real query have
s > 0, so this never changes the paper's form in practice).

alphaQE is applied to the queries, DBA to every database descriptor; used
together (the usual "DBA + alphaQE"), the database is augmented first (an
offline step) and the queries are then expanded with neighbours from the
augmented database.

All descriptors must be L2-normalised (cosine similarity = inner product), as
DELG's are. The neighbour search is :func:`delg_tf.retrieval.search.exact_search`
(chunked, memory bounded by the chunk size). numpy only.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from delg_tf.retrieval.search import (
    DEFAULT_CHUNK_SIZE,
    NORM_TOLERANCE,
    SearchError,
    exact_search,
    l2_normalize,
)

DEFAULT_ALPHA = 3.0  # Radenovic et al. TPAMI 2018: alpha = 3.


def check_normalized(name: str, x: np.ndarray, tolerance: float = NORM_TOLERANCE) -> np.ndarray:
    """Checks that ``x`` is a non-empty [N, D] array of unit-length rows.

    Args:
        name: argument name used in the error message ("queries", "database").
        x: float [N, D].
        tolerance: allowed deviation of each row's L2 norm from 1.

    Returns:
        float32 [N, D] (a view or copy of ``x``).

    Raises:
        SearchError: wrong rank, empty, or rows not L2-normalised.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise SearchError(
            f"{name} must be a non-empty 2-D array [num_descriptors, dim], got shape "
            f"{x.shape}; stack one descriptor per row."
        )
    norms = np.linalg.norm(x, axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0)))
    if abs(norms[worst] - 1.0) > tolerance:
        raise SearchError(
            f"{name} rows must be L2-normalised (norm 1 +- {tolerance}), row {worst} has norm "
            f"{norms[worst]:.6g}; normalise with delg_tf.retrieval.search.l2_normalize first."
        )
    return x


def check_same_dim(queries: np.ndarray, database: np.ndarray) -> None:
    """Raises SearchError when queries [Q, D] and database [N, D'] have D != D'."""
    if queries.shape[1] != database.shape[1]:
        raise SearchError(
            f"descriptor dimensions differ: queries {queries.shape[1]} vs database "
            f"{database.shape[1]}; extract both with the same model."
        )


def _check_count(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise SearchError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def alpha_weights(similarities: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Neighbour weights w = max(s, 0)^alpha (alphaQE, Radenovic et al. TPAMI 2018).

    Args:
        similarities: float [...] inner products with the neighbours.
        alpha: exponent (paper: 3; 0 gives equal weights, average QE).

    Returns:
        float32 [...] same shape.
    """
    if alpha < 0:
        raise SearchError(f"alpha must be >= 0, got {alpha}.")
    return np.power(np.maximum(np.asarray(similarities, dtype=np.float32), 0.0), alpha)


def weighted_expansion(
    descriptors: np.ndarray, neighbors: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """normalise(x + sum_i w_i x_i) for each row: the common alphaQE / DBA update.

    Args:
        descriptors: float [R, D] the descriptors x being expanded (weight 1).
        neighbors: float [R, n, D] their neighbours x_i.
        weights: float [R, n] neighbour weights w_i.

    Returns:
        float32 [R, D], L2-normalised rows.
    """
    total = descriptors + np.einsum("rn,rnd->rd", weights, neighbors)
    return l2_normalize(total)


def alpha_query_expansion(
    queries: np.ndarray,
    database: np.ndarray,
    num_neighbors: int,
    alpha: float = DEFAULT_ALPHA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """alphaQE: q_hat = normalise(q + sum_{i<=n} max(s(q, x_i), 0)^alpha x_i).

    x_1..x_n are the n database descriptors most similar to q (ties by increasing
    database id, as :func:`exact_search`). Radenovic et al. TPAMI 2018: alpha = 3;
    n (nQE) is tuned per dataset there, so it has no default here.

    Cost: O(Q N D) for the neighbour search plus O(Q n D); memory O(Q chunk_size).

    Args:
        queries: float [Q, D], L2-normalised rows.
        database: float [N, D], L2-normalised rows.
        num_neighbors: n >= 0 (0 returns the queries; clipped to N).
        alpha: weight exponent >= 0.
        chunk_size: database rows per matrix product of the search.

    Returns:
        float32 [Q, D] expanded queries, L2-normalised.
    """
    queries = check_normalized("queries", queries)
    database = check_normalized("database", database)
    check_same_dim(queries, database)
    num_neighbors = _check_count("num_neighbors", num_neighbors)
    if num_neighbors == 0:
        return queries.copy()
    ids, scores = exact_search(queries, database, num_neighbors, chunk_size)
    return weighted_expansion(queries, database[ids], alpha_weights(scores, alpha))


def database_neighbors(
    database: np.ndarray, num_neighbors: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tuple[np.ndarray, np.ndarray]:
    """The n nearest other database descriptors of every database descriptor.

    Searches n + 1 neighbours and removes the descriptor itself (or, if an exact
    duplicate pushed it out of the n + 1, the last one), so each row has exactly
    min(n, N - 1) neighbours, best first.

    Cost: O(N^2 D) time, O(N chunk_size) memory.

    Args:
        database: float32 [N, D].
        num_neighbors: n >= 1.
        chunk_size: database rows per matrix product.

    Returns:
        (ids int64 [N, n'], scores float32 [N, n']) with n' = min(n, N - 1).
    """
    num_db = database.shape[0]
    ids, scores = exact_search(database, database, num_neighbors + 1, chunk_size)
    is_self = ids == np.arange(num_db)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True  # self not found: drop the weakest instead.
    keep = ~is_self
    width = ids.shape[1] - 1
    return ids[keep].reshape(num_db, width), scores[keep].reshape(num_db, width)


def database_augmentation(
    database: np.ndarray,
    num_neighbors: int,
    alpha: float = DEFAULT_ALPHA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """DBA: x_hat = normalise(x + sum_{i<=k} max(s(x, x_i), 0)^alpha x_i), every x in the database.

    x_1..x_k are the k other database descriptors most similar to x
    (:func:`database_neighbors`); all rows use the original descriptors (one
    pass, not iterated). DBA of Arandjelovic & Zisserman CVPR 2012 with the alphaQE
    weights of Radenovic et al. TPAMI 2018 (alpha = 3).

    Cost: O(N^2 D) time (exact kNN of the database), O(N chunk_size + N k) memory.

    Args:
        database: float [N, D], L2-normalised rows.
        num_neighbors: k >= 0 (0 returns the database; clipped to N - 1).
        alpha: weight exponent >= 0.
        chunk_size: database rows per matrix product of the search.

    Returns:
        float32 [N, D] augmented database, L2-normalised.
    """
    database = check_normalized("database", database)
    num_neighbors = _check_count("num_neighbors", num_neighbors)
    if num_neighbors == 0 or database.shape[0] == 1:
        return database.copy()
    ids, scores = database_neighbors(database, num_neighbors, chunk_size)
    return weighted_expansion(database, database[ids], alpha_weights(scores, alpha))


def ranking_from_scores(scores: np.ndarray) -> np.ndarray:
    """Revisitop ranking: int64 [N, Q], column q = database ids by decreasing scores[:, q].

    Ties are broken by increasing database id (stable sort).

    Args:
        scores: float [N, Q] similarity of every database image to every query.
    """
    return np.argsort(-scores, axis=0, kind="stable").astype(np.int64)


def expanded_ranking(
    queries: np.ndarray,
    database: np.ndarray,
    qe_neighbors: int,
    dba_neighbors: int = 0,
    alpha: float = DEFAULT_ALPHA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[np.ndarray, np.ndarray]:
    """Full ranking after DBA (optional) and alphaQE, in revisitop layout.

    database' = DBA(database, k = dba_neighbors) (skipped when 0);
    queries' = alphaQE(queries, database', n = qe_neighbors);
    scores = database' @ queries'.T.

    Cost: O(N^2 D) when DBA is on, plus O(Q N D).

    Args:
        queries: float [Q, D], L2-normalised rows.
        database: float [N, D], L2-normalised rows.
        qe_neighbors: n for alphaQE (0 = no query expansion).
        dba_neighbors: k for DBA (0 = no database augmentation).
        alpha: weight exponent of both (paper: 3).
        chunk_size: database rows per matrix product of the searches.

    Returns:
        (ranks int64 [N, Q], scores float32 [N, Q]): column q of ``ranks`` lists
        database ids best first (ties by increasing id); ``scores`` is indexed
        by database id.
    """
    database = database_augmentation(database, dba_neighbors, alpha, chunk_size)
    queries = alpha_query_expansion(queries, database, qe_neighbors, alpha, chunk_size)
    scores = database @ queries.T
    return ranking_from_scores(scores), scores
