"""Global-descriptor search: exact chunked inner product, or faiss (exact / approximate).

DELG global descriptors are L2-normalised (Cao et al. ECCV 2020, Sec. 4.1), so
cosine similarity = inner product and the nearest neighbours by L2 distance
are the top inner products. :func:`exact_search` computes ``Q @ D.T`` in
database chunks and keeps a running top-k, so memory is bounded by
``num_queries * (chunk_size + k)`` floats whatever the database size.

faiss is an optional extra (``pip install delg_tf[faiss]``); :class:`GlobalIndex`
with ``method="faiss_flat"`` (exact ``IndexFlatIP``), ``"faiss_hnsw"`` (HNSW
graph, inner product) or ``"faiss_ivf"`` (IVF-Flat, inner product) uses it and
raises a clear error when it is missing. ``method="exact"`` needs only numpy.

numpy only (faiss imported lazily).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

DEFAULT_CHUNK_SIZE = 8192  # database rows per matrix product.
DEFAULT_TOP_K = 100
METHODS = ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf")
DEFAULT_HNSW_M = 32  # graph degree.
DEFAULT_HNSW_EF_SEARCH = 128
DEFAULT_HNSW_EF_CONSTRUCTION = 80
DEFAULT_IVF_NPROBE = 16
IVF_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid.
NORM_TOLERANCE = 1e-3


class SearchError(ValueError):
    """Bad search input (shapes, dimensions, parameters)."""


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation.

    Args:
        x: float [N, D].
        eps: guards division by zero (zero rows stay zero).

    Returns:
        float32 [N, D].
    """
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _check_inputs(
    queries: np.ndarray, database: np.ndarray, k: int
) -> Tuple[np.ndarray, np.ndarray]:
    queries = np.asarray(queries, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or database.ndim != 2:
        raise SearchError(
            f"queries and database must be 2-D [N, D], got {queries.shape} and {database.shape}."
        )
    if queries.shape[1] != database.shape[1]:
        raise SearchError(
            f"descriptor dimensions differ: queries {queries.shape[1]} vs database "
            f"{database.shape[1]}; extract both with the same model."
        )
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}.")
    return queries, database


def _merge_topk(scores_a, ids_a, scores_b, ids_b, k):
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    return scores, ids


def exact_search(
    queries: np.ndarray,
    database: np.ndarray,
    k: int = DEFAULT_TOP_K,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, database processed in chunks.

    Args:
        queries: float [Q, D] (L2-normalised for cosine similarity).
        database: float [N, D].
        k: number of results (clipped to N).
        chunk_size: database rows per matrix product (memory bound).

    Returns:
        (ids int64 [Q, k'], scores float32 [Q, k']) sorted by decreasing score,
        ties by increasing id; k' = min(k, N).
    """
    queries, database = _check_inputs(queries, database, k)
    if chunk_size < 1:
        raise SearchError(f"chunk_size must be >= 1, got {chunk_size}.")
    num_q, num_db = queries.shape[0], database.shape[0]
    k = min(k, num_db)
    best_s = np.zeros((num_q, 0), dtype=np.float32)
    best_i = np.zeros((num_q, 0), dtype=np.int64)
    for start in range(0, num_db, chunk_size):
        block = queries @ database[start : start + chunk_size].T
        ids = np.broadcast_to(np.arange(start, start + block.shape[1], dtype=np.int64), block.shape)
        best_s, best_i = _merge_topk(best_s, best_i, block, ids, k)
    order = np.lexsort((best_i, -best_s), axis=1) if num_q else np.zeros((0, k), dtype=np.int64)
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def full_ranking(queries: np.ndarray, database: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Complete ranking in revisitop layout (for datasets that fit in memory).

    Args:
        queries: float [Q, D].
        database: float [N, D].

    Returns:
        (ranks int64 [N, Q], scores float32 [N, Q]); column q of ``ranks`` =
        db ids by decreasing similarity; ``scores`` indexed by db id.
    """
    queries, database = _check_inputs(queries, database, 1)
    scores = database @ queries.T
    return np.argsort(-scores, axis=0, kind="stable").astype(np.int64), scores


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "faiss is not installed: install the optional extra with `pip install "
            "'delg_tf[faiss]'` (faiss-cpu), or use method='exact' (numpy only)."
        ) from e
    return faiss


class GlobalIndex:
    """Top-k inner-product search over global descriptors behind one interface.

    Args:
        method: ``"exact"`` (numpy, chunked), ``"faiss_flat"`` (exact),
            ``"faiss_hnsw"`` or ``"faiss_ivf"`` (approximate).
        normalize: L2-normalise database and queries (cosine similarity).
        chunk_size: chunk size of the exact numpy search.
        hnsw_m, hnsw_ef_search, hnsw_ef_construction: HNSW parameters.
        ivf_nlist: IVF lists (default ~sqrt(N), capped by training-set size).
        ivf_nprobe: lists visited per query.
        seed: seed of the IVF k-means.
    """

    def __init__(
        self,
        method: str = "exact",
        normalize: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        hnsw_m: int = DEFAULT_HNSW_M,
        hnsw_ef_search: int = DEFAULT_HNSW_EF_SEARCH,
        hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION,
        ivf_nlist: Optional[int] = None,
        ivf_nprobe: int = DEFAULT_IVF_NPROBE,
        seed: int = 0,
    ):
        if method not in METHODS:
            raise SearchError(f"unknown search method {method!r}; expected one of {METHODS}.")
        self.method = method
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.hnsw_m, self.hnsw_ef_search, self.hnsw_ef_construction = (
            hnsw_m,
            hnsw_ef_search,
            hnsw_ef_construction,
        )
        self.ivf_nlist, self.ivf_nprobe, self.seed = ivf_nlist, ivf_nprobe, seed
        self._database = None
        self._index = None
        if method != "exact":
            self._faiss = _import_faiss()

    @property
    def size(self) -> int:
        """Number of indexed descriptors."""
        return 0 if self._database is None else self._database.shape[0]

    def build(self, database: np.ndarray) -> "GlobalIndex":
        """Indexes ``database`` (float [N, D]); returns self."""
        database = np.asarray(database, dtype=np.float32)
        if database.ndim != 2 or database.shape[0] == 0:
            raise SearchError(
                f"database must be a non-empty [N, D] array, got shape {database.shape}."
            )
        if self.normalize:
            database = l2_normalize(database)
        self._database = np.ascontiguousarray(database)
        if self.method == "exact":
            return self
        faiss = self._faiss
        num, dim = database.shape
        if self.method == "faiss_flat":
            index = faiss.IndexFlatIP(dim)
        elif self.method == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.hnsw_ef_construction
            index.hnsw.efSearch = self.hnsw_ef_search
        else:
            nlist = self.ivf_nlist or max(1, int(np.sqrt(num)))
            nlist = max(1, min(nlist, num // IVF_POINTS_PER_LIST or 1))
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.seed = self.seed
            index.train(self._database)
            index.nprobe = min(self.ivf_nprobe, nlist)
        index.add(self._database)
        self._index = index
        return self

    def search(self, queries: np.ndarray, k: int = DEFAULT_TOP_K) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k database ids and inner-product scores for each query.

        Args:
            queries: float [Q, D].
            k: results per query (clipped to the database size).

        Returns:
            (ids int64 [Q, k'], scores float32 [Q, k']), best first. Approximate
            methods may return fewer than k' valid results; missing ids are -1.
        """
        if self._database is None:
            raise SearchError("index is empty: call build(database) first.")
        queries, _ = _check_inputs(queries, self._database, k)
        if self.normalize:
            queries = l2_normalize(queries)
        if self.method == "exact":
            return exact_search(queries, self._database, k, self.chunk_size)
        k = min(k, self.size)
        scores, ids = self._index.search(np.ascontiguousarray(queries), k)
        return ids.astype(np.int64), scores.astype(np.float32)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Fraction of the exact top-k found by an approximate search (faiss oracle style).

    Args:
        approx_ids: int [Q, k] approximate results.
        exact_ids: int [Q, k] exact results.

    Returns:
        mean over queries of |approx ∩ exact| / k.
    """
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape != exact_ids.shape:
        raise SearchError(f"shapes differ: {approx_ids.shape} vs {exact_ids.shape}.")
    hits = [np.intersect1d(a, e).size for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / exact_ids.shape[1]) if len(hits) else float("nan")
