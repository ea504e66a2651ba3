"""Diffusion re-ranking on a kNN graph of global descriptors (offline, in memory).

Iscen, Tolias, Avrithis, Furon, Chum, "Efficient Diffusion on Region Manifolds:
Recovering Small Objects with Compact CNN Representations", CVPR 2017, here for
one global descriptor per image (the paper's "global" setting). With all
descriptors L2-normalised and s_ij their inner product:

1. Affinity A (N x N, sparse, symmetric): the mutual kNN graph of the database,
   A_ij = max(s_ij, 0)^gamma if j is among the k nearest of i and i among the k
   nearest of j, i != j; A_ii = 0. gamma = 3, k = 50.
2. S = D^-1/2 A D^-1/2 with D = diag(A 1) (symmetric normalisation).
3. For a query q: y_j = max(s(q, x_j), 0)^gamma for its k_q = 10 nearest database
   vectors, 0 elsewhere (the query is not a node of the graph).
4. Ranking scores f solve (I - alpha S) f = y, alpha = 0.99, by conjugate
   gradient (I - alpha S is symmetric positive definite for alpha < 1) from
   f = 0, stopping at relative residual 1e-6 or after 20 iterations.

Exact choices from the authors' MATLAB code (github.com/ahmetius/diffusion-retrieval:
``run_test.m``, ``knngraph.m``, ``transition_matrix.m``, ``ymake.m``, ``dfs.m``):
the kNN lists are those of the database searched against itself, so the k = 50
include the vector itself and the self-loop is then removed (49 other
neighbours); negative similarities are set to 0; y uses the raw top-k_q
similarities to the power gamma; CG (MATLAB ``pcg``) runs at most 20 iterations
with tolerance 1e-6 and its result is used whether or not it converged.
Differences and choices made here: when CG stops without converging, scipy's
``cg`` returns the last iterate while MATLAB's ``pcg`` documents returning the
iterate of smallest residual (the last one minimises the error in the A-norm);
a vector with no mutual neighbour (degree 0) gets D^-1/2 = 0 instead of the
code's 0^-1/2 = Inf, so its row of S is 0 and its score is just y; ties in f (e.g. the images the
diffusion does not reach, f = 0) are broken by the cosine similarity to the
query, then by increasing database id.

Cost: graph O(N^2 D) time (exact kNN, chunked) and O(N k) memory; per query
O(N D) for y and O(iterations N k) for CG. Only for databases whose kNN graph
fits in memory (the truncated system the reference uses for 100k+ images is not
implemented).
numpy + scipy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from delg_tf.retrieval.query_expansion import (
    check_normalized,
    check_same_dim,
    database_neighbors,
)
from delg_tf.retrieval.search import DEFAULT_CHUNK_SIZE, SearchError, exact_search

DEFAULT_ALPHA = 0.99  # run_test.m / paper.
DEFAULT_GAMMA = 3.0  # similarity exponent.
DEFAULT_GRAPH_NEIGHBORS = 50  # k of the database kNN graph, the vector itself included.
DEFAULT_QUERY_NEIGHBORS = 10  # k_q nonzeros of y (global descriptors).
DEFAULT_CG_TOLERANCE = 1e-6  # relative residual.
DEFAULT_CG_ITERATIONS = 20


def _check_positive_int(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise SearchError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def knn_affinity(
    database: np.ndarray,
    num_neighbors: int = DEFAULT_GRAPH_NEIGHBORS,
    gamma: float = DEFAULT_GAMMA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> scipy.sparse.csr_matrix:
    """Mutual kNN affinity A_ij = max(s_ij, 0)^gamma (Iscen et al. CVPR 2017, ``knngraph.m``).

    Args:
        database: float [N, D], L2-normalised rows.
        num_neighbors: k >= 1, the list length *including* the vector itself
            (k - 1 other neighbours; clipped to N).
        gamma: similarity exponent (paper: 3).
        chunk_size: database rows per matrix product of the kNN search.

    Returns:
        float64 CSR [N, N], symmetric, zero diagonal, at most k - 1 entries a row.
    """
    database = check_normalized("database", database)
    num_neighbors = _check_positive_int("num_neighbors", num_neighbors)
    num_db = database.shape[0]
    others = min(num_neighbors, num_db) - 1
    if others == 0:
        return scipy.sparse.csr_matrix((num_db, num_db), dtype=np.float64)
    ids, sims = database_neighbors(database, others, chunk_size)
    weights = np.power(np.maximum(sims.astype(np.float64), 0.0), gamma)
    rows = np.repeat(np.arange(num_db), ids.shape[1])
    directed = scipy.sparse.csr_matrix(
        (weights.ravel(), (rows, ids.ravel())), shape=(num_db, num_db)
    )
    # Mutual edges only; min() also makes the two float32 products s_ij, s_ji agree.
    mutual = directed.minimum(directed.T).tocsr()
    mutual.eliminate_zeros()
    return mutual


def transition_matrix(affinity: scipy.sparse.spmatrix) -> scipy.sparse.csr_matrix:
    """S = D^-1/2 A D^-1/2, D = diag(A 1); degree-0 nodes get D^-1/2 = 0.

    Args:
        affinity: sparse [N, N] symmetric non-negative A.

    Returns:
        float64 CSR [N, N].
    """
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree, dtype=np.float64)
    positive = degree > 0
    inv_sqrt[positive] = 1.0 / np.sqrt(degree[positive])
    scale = scipy.sparse.diags(inv_sqrt)
    return (scale @ affinity @ scale).tocsr()


def diffusion_system(
    database: np.ndarray,
    num_neighbors: int = DEFAULT_GRAPH_NEIGHBORS,
    gamma: float = DEFAULT_GAMMA,
    alpha: float = DEFAULT_ALPHA,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> scipy.sparse.csr_matrix:
    """The offline system matrix I - alpha S of the database (build once, query many).

    Args:
        database: float [N, D], L2-normalised rows.
        num_neighbors: graph k (self included), see :func:`knn_affinity`.
        gamma: similarity exponent.
        alpha: diffusion parameter in [0, 1) (paper: 0.99).
        chunk_size: database rows per matrix product of the kNN search.

    Returns:
        float64 CSR [N, N], symmetric positive definite.
    """
    if not 0.0 <= alpha < 1.0:
        raise SearchError(
            f"alpha must be in [0, 1) so that I - alpha S is positive definite, got {alpha}."
        )
    affinity = knn_affinity(database, num_neighbors, gamma, chunk_size)
    identity = scipy.sparse.identity(affinity.shape[0], dtype=np.float64, format="csr")
    return (identity - alpha * transition_matrix(affinity)).tocsr()


def query_vectors(
    query_ids: np.ndarray, query_sims: np.ndarray, num_db: int, gamma: float = DEFAULT_GAMMA
) -> np.ndarray:
    """Y vectors: y_j = max(s(q, x_j), 0)^gamma on the query's k_q neighbours (``ymake.m``).

    Args:
        query_ids: int [Q, k_q] nearest database ids of each query.
        query_sims: float [Q, k_q] their similarities.
        num_db: N.
        gamma: similarity exponent.

    Returns:
        float64 [Q, N].
    """
    y = np.zeros((query_ids.shape[0], num_db), dtype=np.float64)
    weights = np.power(np.maximum(query_sims.astype(np.float64), 0.0), gamma)
    np.put_along_axis(y, query_ids, weights, axis=1)
    return y


def diffuse(
    system: scipy.sparse.spmatrix,
    y: np.ndarray,
    tolerance: float = DEFAULT_CG_TOLERANCE,
    max_iterations: int = DEFAULT_CG_ITERATIONS,
) -> np.ndarray:
    """F ~ (I - alpha S)^-1 y by conjugate gradient from f = 0 (``dfs.m``).

    Stops when ||y - (I - alpha S) f|| <= tolerance ||y|| or after
    ``max_iterations``; the last iterate is returned either way (scipy's
    ``cg``; see the module docstring for MATLAB's pcg). Cost O(max_iterations nnz(S)).

    Args:
        system: sparse [N, N] I - alpha S.
        y: float [N].
        tolerance: relative residual.
        max_iterations: CG iterations >= 1.

    Returns:
        float64 [N] scores f.
    """
    f, _ = scipy.sparse.linalg.cg(system, y, rtol=tolerance, maxiter=max_iterations)
    return f


def diffusion_ranking(
    queries: np.ndarray,
    database: np.ndarray,
    system: Optional[scipy.sparse.spmatrix] = None,
    graph_neighbors: int = DEFAULT_GRAPH_NEIGHBORS,
    query_neighbors: int = DEFAULT_QUERY_NEIGHBORS,
    gamma: float = DEFAULT_GAMMA,
    alpha: float = DEFAULT_ALPHA,
    tolerance: float = DEFAULT_CG_TOLERANCE,
    max_iterations: int = DEFAULT_CG_ITERATIONS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[np.ndarray, np.ndarray]:
    """Diffusion scores and ranking of every database image for every query.

    Args:
        queries: float [Q, D], L2-normalised rows.
        database: float [N, D], L2-normalised rows.
        system: I - alpha S from :func:`diffusion_system` (built here when None,
            from ``graph_neighbors``, ``gamma`` and ``alpha``).
        graph_neighbors: graph k, the vector itself included (paper: 50).
        query_neighbors: k_q nonzeros of y (paper, global descriptors: 10).
        gamma: similarity exponent of y (and of the graph when built here).
        alpha: diffusion parameter (used only when the system is built here).
        tolerance: CG relative residual.
        max_iterations: CG iterations.
        chunk_size: database rows per matrix product of the searches.

    Returns:
        (ranks int64 [N, Q], scores float64 [N, Q]): revisitop layout, column q =
        database ids by decreasing f, ties by decreasing cosine similarity and
        then increasing id; ``scores[:, q]`` = f indexed by database id.
    """
    queries = check_normalized("queries", queries)
    database = check_normalized("database", database)
    check_same_dim(queries, database)
    query_neighbors = _check_positive_int("query_neighbors", query_neighbors)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    num_db = database.shape[0]
    if system is None:
        system = diffusion_system(database, graph_neighbors, gamma, alpha, chunk_size)
    elif system.shape != (num_db, num_db):
        raise SearchError(
            f"system must be [N, N] for the N = {num_db} database descriptors, got "
            f"{system.shape}; build it with diffusion_system(database)."
        )
    ids, sims = exact_search(queries, database, query_neighbors, chunk_size)
    y = query_vectors(ids, sims, num_db, gamma)
    scores = np.stack(
        [diffuse(system, y[q], tolerance, max_iterations) for q in range(queries.shape[0])], axis=1
    )
    cosine = database @ queries.T
    db_ids = np.arange(num_db)
    ranks = np.stack(
        [np.lexsort((db_ids, -cosine[:, q], -scores[:, q])) for q in range(queries.shape[0])],
        axis=1,
    )
    return ranks.astype(np.int64), scores
