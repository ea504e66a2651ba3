"""Putative local-feature correspondences (DELG, Cao et al. ECCV 2020, Sec. 4.1, App. B).

For each query descriptor the nearest database-image descriptor is found; the
pair is kept when their L2 distance is below a threshold (paper: 1.0 for float
DELG descriptors, 1.1 for binarised DELG*), optionally also requiring mutual
nearest neighbours or Lowe's ratio test. This mirrors the official DELF code,
which queries a ``scipy.spatial.cKDTree`` with ``distance_upper_bound`` (a
*strict* ``<`` test), but uses one matrix product instead: for 1000 x 1000
descriptors of dimension 128 the product is much faster than a k-d tree, which
degenerates to brute force in 128-D (see ``bench/rerank.py``).

Binarised descriptors (DELG*) are packed bits (``np.packbits`` of ``d > 0``,
uint8 [N, D/8]). For ±1 vectors of dimension D normalised by sqrt(D),
``||a - b||^2 = 4 * hamming(a, b) / D``, so an L2 threshold ``t`` is the Hamming
threshold ``hamming < t^2 * D / 4`` (:func:`hamming_threshold_from_l2`). The
packed format, its unpacking and the reference Hamming distance are those of
:mod:`delg_tf.extraction.binarize`, which writes them.

numpy only (and the numpy-only ``delg_tf.extraction.binarize``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from delg_tf.extraction.binarize import BITS_PER_BYTE, unpack_binary
from delg_tf.matching.defaults import DEFAULT_DESCRIPTOR_THRESHOLD
# Upper bound on the number of distance-matrix entries computed at once
# (float32: 16M entries = 64 MB).
MAX_DISTANCE_MATRIX_ENTRIES = 16 * 1024 * 1024


class DescriptorMismatchError(ValueError):
    """Query and database descriptors are not comparable."""


def hamming_threshold_from_l2(l2_threshold: float, num_bits: int) -> float:
    """Hamming distance equivalent to an L2 threshold on sqrt(D)-normalised ±1 vectors.

    Args:
        l2_threshold: L2 distance threshold on normalised vectors.
        num_bits: descriptor dimension D (number of bits).

    Returns:
        ``l2_threshold**2 * num_bits / 4``; pairs with ``hamming < value`` match.
    """
    return float(l2_threshold) ** 2 * num_bits / 4.0


def _check_pair(query: np.ndarray, db: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    query = np.asarray(query)
    db = np.asarray(db)
    for name, arr in (("query", query), ("database", db)):
        if arr.ndim != 2:
            if arr.size == 0:
                continue
            raise DescriptorMismatchError(
                f"{name} {what} must be 2-D [num_features, dim], got shape {arr.shape}."
            )
    if query.size and db.size and query.shape[1] != db.shape[1]:
        raise DescriptorMismatchError(
            f"{what} dimensions differ: query {query.shape[1]} vs database {db.shape[1]}. "
            "Both images must be extracted with the same model/config."
        )
    return query, db


def _nearest_neighbours(
    query: np.ndarray, db: np.ndarray, binary: bool, need_second: bool, need_reverse: bool
) -> Tuple[np.ndarray, ...]:
    """Nearest db neighbour of each query row (memory-bounded row chunks).

    Works on the similarity ``s = q.d - |d|^2 / 2`` (float) or ``a.b`` of ±1
    vectors (binary), whose argmax is the L2 / Hamming nearest neighbour, so
    the common path costs one matrix product plus one pass.

    Returns:
        nn1 int [Nq]; d1 [Nq] squared L2 (float) or Hamming (binary) distance to
        it; d2 [Nq] the same for the second neighbour (inf unless
        ``need_second``); best_q_for_db int [Nd] nearest query of each db row
        (zeros unless ``need_reverse``).
    """
    nq, nd = query.shape[0], db.shape[0]
    if binary:
        q = unpack_binary(query, query.shape[1] * BITS_PER_BYTE)
        d = unpack_binary(db, db.shape[1] * BITS_PER_BYTE)
        num_bits = q.shape[1]
        q_offset = np.full(nq, num_bits * 0.5, dtype=np.float32)
        half_db_sq = np.zeros(nd, dtype=np.float32)
        dist_scale = 0.5  # hamming = D/2 - a.b/2
    else:
        q = query.astype(np.float32, copy=False)
        d = db.astype(np.float32, copy=False)
        q_offset = np.einsum("ij,ij->i", q, q)
        half_db_sq = 0.5 * np.einsum("ij,ij->i", d, d)
        dist_scale = 2.0  # |q-d|^2 = |q|^2 - 2 (q.d - |d|^2/2)
    d_t = np.ascontiguousarray(d.T)
    chunk = max(1, MAX_DISTANCE_MATRIX_ENTRIES // max(nd, 1))
    nn1 = np.empty(nq, dtype=np.int64)
    best = np.empty(nq, dtype=np.float32)
    second = np.full(nq, -np.inf, dtype=np.float32)
    best_q_for_db = np.zeros(nd, dtype=np.int64)
    best_s_for_db = np.full(nd, -np.inf, dtype=np.float32)
    for start in range(0, nq, chunk):
        sim = q[start : start + chunk] @ d_t  # [c, nd]
        if not binary:
            sim -= half_db_sq
        rows = np.arange(sim.shape[0])
        idx = np.argmax(sim, axis=1)
        nn1[start : start + chunk] = idx
        best[start : start + chunk] = sim[rows, idx]
        if need_second and nd > 1:
            sim[rows, idx] = -np.inf
            second[start : start + chunk] = sim.max(axis=1)
            sim[rows, idx] = best[start : start + chunk]
        if need_reverse:
            col_idx = np.argmax(sim, axis=0)
            col_s = sim[col_idx, np.arange(nd)]
            better = col_s > best_s_for_db
            best_q_for_db[better] = col_idx[better] + start
            best_s_for_db[better] = col_s[better]
    if binary:
        d1 = q_offset - dist_scale * best
        d2 = q_offset - dist_scale * second
    else:
        d1 = np.maximum(q_offset - dist_scale * best, 0.0)
        d2 = np.maximum(q_offset - dist_scale * second, 0.0)
    return nn1, d1.astype(np.float64), d2.astype(np.float64), best_q_for_db


def float_squared_distances(query: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Squared L2 distances via one matrix product.

    Args:
        query: float [Nq, D].
        db: float [Nd, D].

    Returns:
        float32 [Nq, Nd], clipped at 0.
    """
    q = query.astype(np.float32, copy=False)
    d = db.astype(np.float32, copy=False)
    sq = np.einsum("ij,ij->i", q, q)[:, None] + np.einsum("ij,ij->i", d, d)[None, :]
    sq -= 2.0 * (q @ d.T)
    np.maximum(sq, 0.0, out=sq)
    return sq


def find_putative_matches(
    query_descriptors: np.ndarray,
    db_descriptors: np.ndarray,
    threshold: Optional[float] = DEFAULT_DESCRIPTOR_THRESHOLD,
    mutual: bool = False,
    ratio: Optional[float] = None,
    binary: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Putative correspondences query -> database image.

    Args:
        query_descriptors: float [Nq, D] (L2-normalised DELG descriptors) or,
            with ``binary=True``, uint8 [Nq, D/8] packed sign bits.
        db_descriptors: same layout, [Nd, ...].
        threshold: L2 distance threshold (strict ``<``, like cKDTree's
            ``distance_upper_bound``); for binary descriptors it is the L2
            threshold on sqrt(D)-normalised ±1 vectors (paper DELG*: 1.1) and is
            converted to Hamming. ``None`` disables it (use with ``ratio``).
        mutual: keep only mutual nearest neighbours.
        ratio: if set, Lowe's ratio test ``d1 < ratio * d2`` (official DELF
            ``use_ratio_test``); needs at least 2 database descriptors.
        binary: descriptors are packed bits.

    Returns:
        (query_idx, db_idx): int64 arrays [M] of matched feature indices, in
        increasing query index order. Empty when either side has no features.

    Raises:
        DescriptorMismatchError: shapes/dimensions are not comparable.
        ValueError: binary descriptors that are not uint8.
    """
    query, db = _check_pair(query_descriptors, db_descriptors, "descriptor")
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if query.size == 0 or db.size == 0:
        return empty
    if binary:
        if query.dtype != np.uint8 or db.dtype != np.uint8:
            raise ValueError(
                f"binary descriptors must be packed uint8 (np.packbits), got "
                f"{query.dtype} and {db.dtype}."
            )
        num_bits = query.shape[1] * BITS_PER_BYTE
        # Hamming distances play the role of squared L2 distances.
        sq_threshold = None if threshold is None else hamming_threshold_from_l2(threshold, num_bits)
        to_dist = np.asarray
    else:
        sq_threshold = None if threshold is None else float(threshold) ** 2
        to_dist = np.sqrt
    nn1, d1, d2, best_q_for_db = _nearest_neighbours(
        query, db, binary, need_second=ratio is not None, need_reverse=mutual
    )
    keep = np.ones(query.shape[0], dtype=bool)
    if sq_threshold is not None:
        keep &= d1 < sq_threshold
    if ratio is not None:
        if db.shape[0] < 2:
            return empty
        keep &= to_dist(d1) < ratio * to_dist(d2)
    if mutual:
        keep &= best_q_for_db[nn1] == np.arange(query.shape[0])
    q_idx = np.flatnonzero(keep).astype(np.int64)
    return q_idx, nn1[q_idx]


def find_putative_matches_kdtree(
    query_descriptors: np.ndarray,
    db_descriptors: np.ndarray,
    threshold: float = DEFAULT_DESCRIPTOR_THRESHOLD,
) -> Tuple[np.ndarray, np.ndarray]:
    """Reference implementation with scipy's cKDTree, as the official DELF code.

    Args:
        query_descriptors: float [Nq, D].
        db_descriptors: float [Nd, D].
        threshold: ``distance_upper_bound`` (strict).

    Returns:
        (query_idx, db_idx) int64 arrays.
    """
    from scipy.spatial import cKDTree

    query, db = _check_pair(query_descriptors, db_descriptors, "descriptor")
    if query.size == 0 or db.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, idx = cKDTree(db).query(query, distance_upper_bound=threshold)
    q_idx = np.flatnonzero(idx != db.shape[0]).astype(np.int64)
    return q_idx, idx[q_idx].astype(np.int64)
