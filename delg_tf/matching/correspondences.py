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

:func:`find_putative_matches_batch` matches one query against a whole shortlist
with exactly the arrays of :func:`find_putative_matches` (the per-pair
reference) for every image: float similarities come from a product rounded
differently, so each of its decisions is certified against a rigorous float32
rounding bound and the rare uncertain image is recomputed per pair. With a
distance threshold (and no ratio test) it first *screens* the shortlist with
bfloat16 matrix products through TensorFlow / oneDNN (AMX or AVX512_BF16 where the
CPU has them): a rigorous bound on their error (:func:`bfloat16_screen_error_bound`)
proves that all but a few (query row, db row) entries are beyond the threshold, and
only those few are recomputed and certified (:func:`screened_matches`;
:func:`bfloat16_screen_error` probes whether the screen can run).

numpy only (and the numpy-only ``delg_tf.extraction.binarize``); TensorFlow is
imported lazily, by the screen only, and is optional (without it, or where the
screen's probe fails, the batched path runs without the screen).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np

from delg_tf.extraction.binarize import BITS_PER_BYTE, unpack_binary
from delg_tf.matching.defaults import DEFAULT_DESCRIPTOR_THRESHOLD

# Upper bound on the number of distance-matrix entries computed at once
# (float32: 16M entries = 64 MB).
MAX_DISTANCE_MATRIX_ENTRIES = 16 * 1024 * 1024
# Unit roundoff of float32 (half an ulp of 1).
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
# Margin on the rigorous rounding bound of the batched path (covers evaluating it in floats).
ERROR_BOUND_SAFETY = 1.25
# Absolute term of that bound (float32 underflow of tiny products).
ERROR_BOUND_ABSOLUTE = 1e-30
# Relative error of rounding a float32 to bfloat16 (8 significant bits) by any rounding:
# below one unit in the last place, 2^-7 relative (to nearest: 2^-8). The screen truncates
# its inputs; oneDNN rounds its output to nearest.
BFLOAT16_ROUNDOFF = 2.0**-7
# Most screen entries (query row, db row) per query row on average, for one image, above
# which the image takes the float32 product instead (e.g. thresholds near sqrt(2)).
SCREEN_MAX_ENTRIES_PER_ROW = 16
# Database rows per max-pool window of the screen (1000 features: 50 windows).
SCREEN_POOL_WINDOW = 20
# Byte alignment TensorFlow (Eigen) requires of the buffers it shares with numpy.
TENSOR_ALIGNMENT = 64
# When the screen runs by default (screen=None): descriptors of at least this dimension
# and on average at least this many float32 multiply-adds (query rows x database rows x
# dimension) per image. Below, the float32 product alone is faster on this package's CPUs
# (the screen's fixed cost per call dominates; at 32 dimensions its error bound leaves
# too many pairs to recompute); the matches are the same either way.
SCREEN_MIN_DIM = 64
SCREEN_MIN_MULTIPLY_ADDS_PER_IMAGE = 20_000_000


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


def _prepare_query(query: np.ndarray, binary: bool) -> Tuple[np.ndarray, np.ndarray]:
    """float32 query rows and the per-row offset turning a similarity into a distance."""
    if binary:
        q = unpack_binary(query, query.shape[1] * BITS_PER_BYTE)
        return q, np.full(q.shape[0], q.shape[1] * 0.5, dtype=np.float32)
    q = query.astype(np.float32, copy=False)
    return q, np.einsum("ij,ij->i", q, q)


def _prepare_db(db: np.ndarray, binary: bool) -> Tuple[np.ndarray, np.ndarray]:
    """float32 database rows and ``|d|^2 / 2`` (zeros for ±1 vectors, whose norm is constant)."""
    if binary:
        d = unpack_binary(db, db.shape[1] * BITS_PER_BYTE)
        return d, np.zeros(d.shape[0], dtype=np.float32)
    d = db.astype(np.float32, copy=False)
    return d, 0.5 * np.einsum("ij,ij->i", d, d)


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
    q, q_offset = _prepare_query(query, binary)
    d, half_db_sq = _prepare_db(db, binary)
    return _nearest_neighbours_prepared(
        q, q_offset, d, half_db_sq, binary, need_second, need_reverse
    )


def _nearest_neighbours_prepared(
    q: np.ndarray,
    q_offset: np.ndarray,
    d: np.ndarray,
    half_db_sq: np.ndarray,
    binary: bool,
    need_second: bool,
    need_reverse: bool,
) -> Tuple[np.ndarray, ...]:
    """:func:`_nearest_neighbours` on the outputs of ``_prepare_query`` / ``_prepare_db``."""
    nq, nd = q.shape[0], d.shape[0]
    # hamming = D/2 - a.b/2 (binary); |q-d|^2 = |q|^2 - 2 (q.d - |d|^2/2) (float).
    dist_scale = 0.5 if binary else 2.0
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


def _validated_pair(
    query_descriptors: np.ndarray, db_descriptors: np.ndarray, binary: bool
) -> Tuple[np.ndarray, np.ndarray, bool]:
    """(query, db, both_non_empty) after the shape and binary dtype checks."""
    query, db = _check_pair(query_descriptors, db_descriptors, "descriptor")
    if query.size == 0 or db.size == 0:
        return query, db, False
    if binary and (query.dtype != np.uint8 or db.dtype != np.uint8):
        raise ValueError(
            f"binary descriptors must be packed uint8 (np.packbits), got "
            f"{query.dtype} and {db.dtype}."
        )
    return query, db, True


def _squared_threshold(
    threshold: Optional[float], binary: bool, num_columns: int
) -> Optional[float]:
    """The threshold on d1: squared L2 (float) or Hamming (binary, ``num_columns`` bytes)."""
    if threshold is None:
        return None
    if binary:
        # Hamming distances play the role of squared L2 distances.
        return hamming_threshold_from_l2(threshold, num_columns * BITS_PER_BYTE)
    return float(threshold) ** 2


def _empty_matches() -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


def _select_matches(
    nn1: np.ndarray,
    d1: np.ndarray,
    d2: np.ndarray,
    best_q_for_db: np.ndarray,
    num_db: int,
    sq_threshold: Optional[float],
    mutual: bool,
    ratio: Optional[float],
    binary: bool,
) -> Tuple[np.ndarray, np.ndarray]:
    """The threshold / ratio / mutual tests on the outputs of :func:`_nearest_neighbours`."""
    to_dist = np.asarray if binary else np.sqrt
    keep = np.ones(nn1.shape[0], dtype=bool)
    if sq_threshold is not None:
        keep &= d1 < sq_threshold
    if ratio is not None:
        if num_db < 2:
            return _empty_matches()
        keep &= to_dist(d1) < ratio * to_dist(d2)
    if mutual:
        keep &= best_q_for_db[nn1] == np.arange(nn1.shape[0])
    q_idx = np.flatnonzero(keep).astype(np.int64)
    return q_idx, nn1[q_idx]


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
    query, db, non_empty = _validated_pair(query_descriptors, db_descriptors, binary)
    if not non_empty:
        return _empty_matches()
    nn1, d1, d2, best_q_for_db = _nearest_neighbours(
        query, db, binary, need_second=ratio is not None, need_reverse=mutual
    )
    return _select_matches(
        nn1,
        d1,
        d2,
        best_q_for_db,
        db.shape[0],
        _squared_threshold(threshold, binary, query.shape[1]),
        mutual,
        ratio,
        binary,
    )


@dataclasses.dataclass
class BatchMatchStats:
    """Counters filled by :func:`find_putative_matches_batch` (for benchmarks).

    Attributes:
        pairs: image pairs matched.
        fallback_pairs: float pairs recomputed by :func:`find_putative_matches`
            because a decision was within the rounding bound of the batched product.
        screened_pairs: pairs that went through the bfloat16 screen.
        screened_rows: query rows of those pairs.
        open_rows: of those, the rows with screen entries (possible matches).
        screen_entries: the (query row, db row) entries recomputed after the screen.
        unscreened_pairs: pairs that took the float32 product of every row (no screen,
            or a screen decision not certain).
    """

    pairs: int = 0
    fallback_pairs: int = 0
    screened_pairs: int = 0
    screened_rows: int = 0
    open_rows: int = 0
    screen_entries: int = 0
    unscreened_pairs: int = 0


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term float32 sum."""
    return n * FLOAT32_UNIT_ROUNDOFF / (1.0 - n * FLOAT32_UNIT_ROUNDOFF)


def similarity_error_bound(q_sq_max: float, half_db_sq_max: float, dim: int) -> float:
    """Bound on |batched - per-pair| float32 similarity ``q.d - |d|^2/2`` of one image pair.

    The per-pair path computes ``fl(fl(q.d) - h)`` (a dim-term BLAS dot, then a
    subtraction), the batched path the (dim+1)-term dot ``[q, 1].[d, -h]`` with the
    same float32 ``h = |d|^2 / 2``. Any summation order of an n-term float32 dot is
    within ``gamma_n * sum_k |a_k b_k|`` of the exact value, and ``sum_k |q_k d_k| <=
    |q| |d|``, so the two differ by at most ``(gamma_{dim+1} + gamma_dim + 2u) (|q| |d|
    + h)``; the einsum norms of either path may differ by ``2 gamma_dim`` relative.
    Multiplied by :data:`ERROR_BOUND_SAFETY` (norms and bounds evaluated in floating
    point), plus :data:`ERROR_BOUND_ABSOLUTE` for underflow.

    Args:
        q_sq_max: largest ``|q|^2`` of the query rows.
        half_db_sq_max: largest ``|d|^2 / 2`` of the database rows.
        dim: descriptor dimension.

    Returns:
        The bound (float; NaN or inf for non-finite descriptors).
    """
    unit = FLOAT32_UNIT_ROUNDOFF
    norms = np.sqrt(q_sq_max) * np.sqrt(2.0 * half_db_sq_max)
    relative = _gamma(dim + 1) + _gamma(dim) + 2.0 * unit
    bound = relative * (norms + half_db_sq_max) + 2.0 * _gamma(dim) * half_db_sq_max
    return float(ERROR_BOUND_SAFETY * bound + ERROR_BOUND_ABSOLUTE)


# Tri-state of a certified decision.
_FALSE, _TRUE, _UNSURE = 0, 1, 2


def _tri_state(certainly_true: np.ndarray, certainly_false: np.ndarray) -> np.ndarray:
    """int8 [N]: _TRUE / _FALSE where certain, _UNSURE elsewhere (also for NaN)."""
    state = np.full(certainly_true.shape, _UNSURE, dtype=np.int8)
    state[certainly_false] = _FALSE
    state[certainly_true & ~certainly_false] = _TRUE
    return state


def _tri_and(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Three-valued AND: false if either is false, true if both are true, else unsure."""
    out = np.where((a == _TRUE) & (b == _TRUE), _TRUE, _UNSURE).astype(np.int8)
    out[(a == _FALSE) | (b == _FALSE)] = _FALSE
    return out


def _sq_distance_bounds(
    q_sq: np.ndarray, sim: np.ndarray, err: float, dim: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Interval of the per-pair path's ``max(fl32(|q|^2 - 2 s), 0)`` when |s - sim| <= err."""
    q_sq = q_sq.astype(np.float64)
    sim = sim.astype(np.float64)
    q_sq_slack = 2.0 * _gamma(dim) * np.abs(q_sq)
    # float32 rounding of the per-pair subtraction (u |y|) and float64 evaluation here.
    pad = 2.0 * FLOAT32_UNIT_ROUNDOFF * (np.abs(q_sq) + 2.0 * np.abs(sim) + 2.0 * err)
    with np.errstate(invalid="ignore"):
        low = q_sq - q_sq_slack - 2.0 * (sim + err) - pad
        high = q_sq + q_sq_slack - 2.0 * (sim - err) + pad
    return np.maximum(low, 0.0), np.maximum(high, 0.0)


def _certified_float_matches(
    q_aug: np.ndarray,
    q_sq: np.ndarray,
    db: np.ndarray,
    sq_threshold: Optional[float],
    mutual: bool,
    ratio: Optional[float],
    workspace: List[np.ndarray],
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Putative matches of one float pair from ``[q, 1] @ [d, -|d|^2/2].T``, or None.

    Every decision of :func:`find_putative_matches` (nearest neighbour, its
    distance against the strict threshold, the ratio test, the reverse nearest
    neighbour) is taken only where it holds for every similarity within
    :func:`similarity_error_bound` of the batched one, hence also for the
    per-pair path's own float32 values. None when some decision is not certain
    (near-ties, e.g. duplicated descriptors, values at the threshold, NaN): the
    caller then runs the per-pair function. ``workspace`` holds one reusable
    float32 buffer for the similarities (grown when needed).
    """
    nq, dim = q_aug.shape[0], q_aug.shape[1] - 1
    d, half_db_sq = _prepare_db(db, binary=False)
    nd = d.shape[0]
    if ratio is not None and nd < 2:
        return _empty_matches()
    if mutual and nq * nd > MAX_DISTANCE_MATRIX_ENTRIES:
        return None  # the reverse test needs whole columns: per-pair path.
    err = similarity_error_bound(float(q_sq.max()), float(half_db_sq.max()), dim)
    d_aug = np.empty((nd, dim + 1), dtype=np.float32)
    d_aug[:, :dim] = d
    d_aug[:, dim] = -half_db_sq
    chunk = max(1, MAX_DISTANCE_MATRIX_ENTRIES // nd)
    if workspace[0].size < min(chunk, nq) * nd:
        workspace[0] = np.empty(min(chunk, nq) * nd, dtype=np.float32)
    nn1 = np.empty(nq, dtype=np.int64)
    best = np.empty(nq, dtype=np.float32)
    second = np.full(nq, -np.inf, dtype=np.float32)
    state = np.empty(nq, dtype=np.int8)
    sim = None
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        sim = workspace[0][: (stop - start) * nd].reshape(stop - start, nd)
        np.matmul(q_aug[start:stop], d_aug.T, out=sim)  # [c, nd] ~ q.d - |d|^2/2
        rows = np.arange(stop - start)
        idx = np.argmax(sim, axis=1)
        nn1[start:stop] = idx
        best[start:stop] = sim[rows, idx]
        d1_low, d1_high = _sq_distance_bounds(q_sq[start:stop], best[start:stop], err, dim)
        part = np.full(stop - start, _TRUE, dtype=np.int8)
        if sq_threshold is not None:
            part = _tri_state(d1_high < sq_threshold, d1_low >= sq_threshold)
        # The second best: for the ratio test of every row, else to certify the
        # nearest neighbour of the rows that may be kept.
        if nd > 1 and ratio is not None:
            sim[rows, idx] = -np.inf
            second[start:stop] = sim.max(axis=1)
            sim[rows, idx] = best[start:stop]
        elif nd > 1:
            cand = np.flatnonzero(part != _FALSE)
            others = sim[cand]
            others[np.arange(cand.size), idx[cand]] = -np.inf
            second[start + cand] = others.max(axis=1)
        if ratio is not None:
            d2_low, d2_high = _sq_distance_bounds(q_sq[start:stop], second[start:stop], err, dim)
            rel = 4.0 * np.finfo(np.float64).eps
            with np.errstate(invalid="ignore"):
                lhs_low, lhs_high = np.sqrt(d1_low) * (1 - rel), np.sqrt(d1_high) * (1 + rel)
                rhs_a, rhs_b = ratio * np.sqrt(d2_low), ratio * np.sqrt(d2_high)
                rhs_low = np.minimum(rhs_a, rhs_b)
                rhs_high = np.maximum(rhs_a, rhs_b)
                rhs_low = rhs_low - rel * np.abs(rhs_low)
                rhs_high = rhs_high + rel * np.abs(rhs_high)
            part = _tri_and(part, _tri_state(lhs_high < rhs_low, lhs_low >= rhs_high))
        # Rows that may be kept need a certain nearest neighbour.
        open_rows = part != _FALSE
        gap_ok = best[start:stop].astype(np.float64) - second[start:stop] > 2.0 * err
        part[open_rows & ~gap_ok] = _UNSURE
        if np.any(part == _UNSURE):
            return None
        state[start:stop] = part
    if mutual:
        open_rows = np.flatnonzero(state != _FALSE)
        if open_rows.size:
            # Single chunk (checked above): ``sim`` holds every row.
            cols, pos = np.unique(nn1[open_rows], return_inverse=True)
            block = sim[:, cols]
            top_row = np.argmax(block, axis=0)
            top = block[top_row, np.arange(cols.size)]
            block[top_row, np.arange(cols.size)] = -np.inf
            runner_up = block.max(axis=0) if nq > 1 else np.full(cols.size, -np.inf)
            other = np.where(top_row[pos] == open_rows, runner_up[pos], top[pos])
            mine = best[open_rows].astype(np.float64)
            mutual_state = _tri_state(mine - other > 2.0 * err, other - mine > 2.0 * err)
            if np.any(mutual_state == _UNSURE):
                return None
            state[open_rows] = mutual_state
    q_idx = np.flatnonzero(state == _TRUE).astype(np.int64)
    return q_idx, nn1[q_idx]


def bfloat16_screen_error_bound(q_norm: np.ndarray, d_norm_max: float, dim: int) -> np.ndarray:
    """Bound on |q.d - screen| of the bfloat16 screen, per query row.

    The screen rounds float32 ``q`` and ``d`` to bfloat16 (``|x^ - x| <= rho |x|``
    per component, rho = :data:`BFLOAT16_ROUNDOFF`, whatever the rounding), so
    ``|q.d - q^.d^| <= sum_k |q_k d_k| ((1 + rho)^2 - 1) <= (2 rho + rho^2) |q| |d|``.
    bfloat16 products are exact in float32, and oneDNN accumulates bfloat16 matrix
    products in float32 (documented; :func:`bfloat16_screen_error` probes it), in any
    order within ``gamma_dim (1 + rho)^2 |q| |d|``; the result is rounded to
    bfloat16 once more (``rho`` relative). Multiplied by :data:`ERROR_BOUND_SAFETY`
    (norms evaluated in floating point), plus ``dim 2^-126 (|q| + |d| + 1)`` for
    denormal inputs and products (AVX512_BF16 and AMX flush them to zero: each lost
    term is below ``2^-126`` times a component) and :data:`ERROR_BOUND_ABSOLUTE`.

    Args:
        q_norm: float [Nq] query row norms ``|q|``.
        d_norm_max: largest database row norm ``|d|`` of the image.
        dim: descriptor dimension.

    Returns:
        float64 [Nq] bounds (NaN or inf for non-finite descriptors).
    """
    rho = BFLOAT16_ROUNDOFF
    gamma = _gamma(dim)
    inputs = 2.0 * rho + rho * rho
    accumulate = gamma * (1.0 + rho) ** 2
    output = rho * (1.0 + gamma) * (1.0 + rho) ** 2
    q_norm = np.asarray(q_norm, dtype=np.float64)
    norms = q_norm * float(d_norm_max)
    denormals = dim * 2.0**-126 * (q_norm + float(d_norm_max) + 1.0)
    relative = inputs + accumulate + output
    return ERROR_BOUND_SAFETY * (relative * norms + denormals) + ERROR_BOUND_ABSOLUTE


@functools.cache
def _bfloat16_product_function():
    """TensorFlow graph: float32 [Nd, Nq] bfloat16 product ``d @ q.T`` (for the probe).

    Takes bfloat16 bit patterns in uint16 (:func:`_bfloat16_bits`), as the screen.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.uint16)

    @tf.function(input_signature=[spec, spec])
    def product(query, db):
        q, d = tf.bitcast(query, tf.bfloat16), tf.bitcast(db, tf.bfloat16)
        return tf.cast(tf.matmul(d, q, transpose_b=True), tf.float32)

    return product


@functools.cache
def _bfloat16_screen_function():
    """TensorFlow graph of the screen: the (db row, query row) entries above a cut.

    One call takes the query [Nq, D] and the database rows of K images concatenated
    [N, D], both as bfloat16 bit patterns in uint16 (:func:`_bfloat16_bits`; each
    image padded to a multiple of :data:`SCREEN_POOL_WINDOW` rows by repeating its
    last row), the K + 1 padded row offsets, the K real row counts, the cuts as
    bfloat16 bits [K, Nq] and the most entries an image may return. A while loop
    takes the images one by one (each [Nd_k, Nq] block stays in cache): one
    ``[Nd_k, D] @ [D, Nq]`` bfloat16 product (oneDNN), a max pool over windows of
    :data:`SCREEN_POOL_WINDOW` db rows (oneDNN), the windows whose maximum reaches
    the query row's cut, and in those windows the entries that reach it (real rows
    only). Returns (int64 [M, 2] db row within its image and query row of the
    entries, int32 [K] entries per image, -1 where there were too many).
    """
    import tensorflow as tf

    window = SCREEN_POOL_WINDOW

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.uint16),
            tf.TensorSpec([None, None], tf.uint16),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.uint16),
            tf.TensorSpec([], tf.int32),
        ]
    )
    def screen(query, db, offsets, sizes, cuts, max_entries):
        q = tf.bitcast(query, tf.bfloat16)
        d = tf.bitcast(db, tf.bfloat16)
        cut = tf.bitcast(cuts, tf.bfloat16)
        num_images = tf.size(offsets) - 1
        found = tf.TensorArray(tf.int64, size=num_images, element_shape=[None, 2])
        counts = tf.TensorArray(tf.int32, size=num_images, element_shape=[])
        steps = tf.range(window, dtype=tf.int64)[None, :]

        def entries(sim, pooled, cut_k, size):
            hits = tf.where(pooled >= cut_k[None, :])  # [m, 2] (window, query row)
            db_rows = hits[:, :1] * window + steps  # [m, window]
            q_rows = tf.broadcast_to(hits[:, 1:], tf.shape(db_rows))
            pos = tf.stack([db_rows, q_rows], axis=-1)
            keep = (tf.gather_nd(sim, pos) >= tf.gather(cut_k, q_rows)) & (
                db_rows < tf.cast(size, tf.int64)
            )
            return tf.boolean_mask(pos, keep)

        def body(k, found, counts):
            sim = tf.matmul(d[offsets[k] : offsets[k + 1]], q, transpose_b=True)  # [Nd_k, Nq]
            pooled = tf.nn.max_pool2d(sim[None, None], [1, window], [1, window], "VALID")
            pooled = pooled[0, 0]  # [Nd_k / window, Nq]
            num_windows = tf.reduce_sum(tf.cast(pooled >= cut[k][None, :], tf.int32))
            fits = num_windows * window <= max_entries
            got = tf.cond(
                fits,
                lambda: entries(sim, pooled, cut[k], sizes[k]),
                lambda: tf.zeros([0, 2], dtype=tf.int64),
            )
            count = tf.where(fits, tf.shape(got)[0], -1)
            return k + 1, found.write(k, got), counts.write(k, count)

        _, found, counts = tf.while_loop(lambda k, *_: k < num_images, body, (0, found, counts))
        return found.concat(), counts.stack()

    return screen


def _padded_rows(num_rows: int) -> int:
    """``num_rows`` rounded up to a multiple of :data:`SCREEN_POOL_WINDOW`."""
    return -(-num_rows // SCREEN_POOL_WINDOW) * SCREEN_POOL_WINDOW


def _bfloat16_bits(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint16 [N, D] bit patterns of float32 ``x`` [N, D] truncated to bfloat16 (high halves).

    Truncation is within :data:`BFLOAT16_ROUNDOFF` relative of ``x``; it is one pass
    (a 16-bit shift of the float32 bits). ``out`` (uint16 [N, D]) receives the result
    when given.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, dtype=np.uint16)
    np.right_shift(x.view(np.uint32), np.uint32(16), out=out, casting="unsafe")
    return out


def _aligned_empty(shape: Tuple[int, int], dtype) -> np.ndarray:
    """np.empty aligned to :data:`TENSOR_ALIGNMENT` bytes (TensorFlow may alias it)."""
    itemsize = np.dtype(dtype).itemsize
    size = int(np.prod(shape)) * itemsize
    raw = np.empty(size + TENSOR_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def _as_tensor(array: np.ndarray):
    """A TensorFlow tensor sharing ``array``'s memory (DLPack) when aligned, else a copy."""
    import tensorflow as tf

    if array.ctypes.data % TENSOR_ALIGNMENT == 0 and array.flags.c_contiguous:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.convert_to_tensor(array)


def _bfloat16_floor_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bit patterns of the largest bfloat16 ``<= x`` (float64 array, finite)."""
    x32 = x.astype(np.float32)
    x32 = np.where(x32.astype(np.float64) > x, np.nextafter(x32, np.float32(-np.inf)), x32)
    bits = x32.view(np.uint32)
    low = bits & np.uint32(0xFFFF)
    high = (bits >> 16).astype(np.uint16)
    # Truncation rounds toward zero: a negative value with dropped bits goes one step down.
    step_down = (x32 < 0) & (low != 0)
    return np.where(step_down, high + np.uint16(1), high).astype(np.uint16)


# The screen's graphs on tiny inputs, run in a child process first: where oneDNN cannot
# create a bfloat16 matmul (e.g. ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU) TensorFlow
# aborts the whole process instead of raising.
_CHILD_PROBE = """
import numpy as np
from delg_tf.matching import correspondences as c
q = np.ones((4, 128), np.float32)
c._bfloat16_product_function()(c._bfloat16_bits(q), c._bfloat16_bits(q)).numpy()
c._screen_candidates(q, [q], np.zeros((1, 4)), 16)
print("ok")
"""
# Seconds the child probe may take (it imports TensorFlow: a few seconds).
CHILD_PROBE_TIMEOUT = 300


def _child_probe_error() -> Optional[str]:
    """None if the screen's graphs run in a child process with this environment."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD_PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=CHILD_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"child probe failed: {type(e).__name__}: {e}"
    if done.returncode != 0 or done.stdout.strip().splitlines()[-1:] != ["ok"]:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "what()" in line or "Error" in line), "")
        return (
            f"a bfloat16 matmul ends a child process (exit code {done.returncode}"
            f"{': ' + detail[:200] if detail else ''})"
        )
    return None


# Probe of the screen: a row whose float32 accumulation gives 2^8 + 127 = 383 (rounded
# to nearest bfloat16: 384) where a bfloat16 running sum gives 256; the 256 at several
# positions.
_PROBE_DIM = 128
_PROBE_BIG = 256.0


# Serialises the first probe (Reranker workers may ask at the same time).
_PROBE_LOCK = threading.Lock()


def bfloat16_screen_error() -> Optional[str]:
    """None if the bfloat16 screen can run in this process, else the reason.

    See :func:`_bfloat16_screen_probe` (run once per process, under a lock).

    Returns:
        None, or a one-line reason.
    """
    with _PROBE_LOCK:
        return _bfloat16_screen_probe()


@functools.cache
def _bfloat16_screen_probe() -> Optional[str]:
    """None if the bfloat16 screen can run in this process, else the reason.

    Probed once per process: the screen's graphs must run in a child process (a
    TensorFlow that cannot create a bfloat16 matmul aborts instead of raising, e.g.
    under ``ONEDNN_MAX_CPU_ISA=AVX2``), TensorFlow must import, and its bfloat16 product must
    accumulate in float32 (the premise of :func:`bfloat16_screen_error_bound`): rows
    of one 256 and 127 ones, the 256 at several positions, must give 383 rounded to
    bfloat16 (384), not the 256 of a bfloat16 running sum; random unit descriptors
    must stay within the bound; and the screen's graph must run. On failure the
    batched path runs without the screen.

    Returns:
        None, or a one-line reason (the exception or the wrong value).
    """
    child = _child_probe_error()
    if child is not None:
        return child
    try:
        product = _bfloat16_product_function()
        positions = np.arange(0, _PROBE_DIM, 7)
        query = np.ones((positions.size, _PROBE_DIM), dtype=np.float32)
        query[np.arange(positions.size), positions] = _PROBE_BIG
        ones = np.ones((1, _PROBE_DIM), dtype=np.float32)
        got = product(_bfloat16_bits(query), _bfloat16_bits(ones)).numpy()[0]
        if not np.all(got == _PROBE_BIG + _PROBE_DIM):
            return f"bfloat16 matmul does not accumulate in float32: got {sorted(set(got))}"
        rng = np.random.default_rng(0)
        q = rng.normal(size=(64, _PROBE_DIM)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        d = rng.normal(size=(256, _PROBE_DIM)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        exact = q.astype(np.float64) @ d.T.astype(np.float64)
        bound = bfloat16_screen_error_bound(np.ones(64), 1.0, _PROBE_DIM)
        got = product(_bfloat16_bits(q), _bfloat16_bits(d)).numpy().T
        if not np.all(np.abs(got - exact) <= bound[:, None]):
            return "bfloat16 matmul error exceeds bfloat16_screen_error_bound"
        _screen_candidates(q, [d], np.zeros((1, 64)), max_entries=64 * 256)
    except Exception as e:  # noqa: BLE001 - any failure (no TensorFlow, no kernel) disables it.
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _screen_candidates(
    q: np.ndarray, dbs: Sequence[np.ndarray], cuts: np.ndarray, max_entries: int
) -> List[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """Per image, the (query row, db row) entries whose bfloat16 ``q . d`` is >= the cut.

    Args:
        q: float32 [Nq, D] query descriptors.
        dbs: K non-empty float32 database arrays [Nd_k, D].
        cuts: float64 [K, Nq] cuts (finite), rounded down to bfloat16.
        max_entries: most entries per image (more: None for that image).

    Returns:
        K items: (query rows, db rows) int64 arrays sorted by query row then db row,
        or None where the image had more than ``max_entries`` entries.
    """
    screen = _bfloat16_screen_function()
    nq, dim = q.shape
    # The buffers shared with TensorFlow are aligned; it copies the image blocks it slices
    # out of them where those are not (rows of other widths than 128).
    q_bits = _as_tensor(_bfloat16_bits(q, _aligned_empty((nq, dim), np.uint16)))
    cut_bits = _bfloat16_floor_bits(cuts)
    out: List[Optional[Tuple[np.ndarray, np.ndarray]]] = []
    max_rows = max(1, MAX_DISTANCE_MATRIX_ENTRIES // dim)
    start = 0
    while start < len(dbs):
        stop, rows = start + 1, _padded_rows(dbs[start].shape[0])
        while stop < len(dbs) and rows + _padded_rows(dbs[stop].shape[0]) <= max_rows:
            rows += _padded_rows(dbs[stop].shape[0])
            stop += 1
        sizes = np.array([db.shape[0] for db in dbs[start:stop]], dtype=np.int32)
        offsets = np.zeros(stop - start + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([_padded_rows(n) for n in sizes])
        stacked = _aligned_empty((rows, dim), np.uint16)
        for k, db in enumerate(dbs[start:stop]):
            last = offsets[k] + sizes[k]
            _bfloat16_bits(db, stacked[offsets[k] : last])
            stacked[last : offsets[k + 1]] = stacked[last - 1]
        found, counts = screen(
            q_bits,
            _as_tensor(stacked),
            offsets,
            sizes,
            cut_bits[start:stop],
            np.int32(max_entries),
        )
        found, counts = found.numpy(), counts.numpy()
        first = 0
        for k in range(stop - start):
            if counts[k] < 0:
                out.append(None)
                continue
            block = found[first : first + counts[k]]
            first += counts[k]
            q_rows, d_rows = block[:, 1], block[:, 0]
            order = np.lexsort((d_rows, q_rows))
            out.append((q_rows[order], d_rows[order]))
        start = stop
    return out


def _screen_upper_similarity(q_sq: np.ndarray, sq_threshold: float, dim: int) -> np.ndarray:
    """float64 [Nq]: per-pair similarities ``s < U`` give squared distances ``>= sq_threshold``.

    ``U`` solves ``low(U) = sq_threshold`` for the lower end ``low`` of
    ``_sq_distance_bounds`` (the interval of the per-pair path's float32 distance),
    then is lowered until ``low(U) >= sq_threshold`` holds when evaluated.
    """
    q_sq = q_sq.astype(np.float64)
    unit = FLOAT32_UNIT_ROUNDOFF
    upper = (q_sq * (1.0 - 2.0 * _gamma(dim) - 2.0 * unit) - sq_threshold) / (2.0 + 4.0 * unit)
    for _ in range(64):
        low, _ = _sq_distance_bounds(q_sq, upper, 0.0, dim)
        bad = ~(low >= sq_threshold)
        if not np.any(bad):
            return upper
        upper[bad] -= 1e-7 * np.abs(upper[bad]) + 1e-30
    raise FloatingPointError("could not bound the screen's cut (non-finite norms?)")


def screened_matches(
    q: np.ndarray,
    q_sq: np.ndarray,
    dbs: Sequence[np.ndarray],
    sq_threshold: float,
    mutual: bool,
    stats: Optional["BatchMatchStats"] = None,
) -> List[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """:func:`find_putative_matches` (threshold, optional mutual) through the bfloat16 screen.

    Per image, every per-pair decision involves only entries with a per-pair
    similarity ``s = q.d - |d|^2/2 >= U`` (a kept row's nearest neighbour has
    ``s >= U_i``, :func:`_screen_upper_similarity`; with ``mutual``, a competing query
    row of that column too, so the image takes one ``U = min_i U_i``). The screen
    returns the entries whose bfloat16 ``q.d`` is at least ``U - E - err + min_j
    |d_j|^2/2`` (:func:`bfloat16_screen_error_bound` ``E``, :func:`similarity_error_bound`
    ``err``; the cut rounded down to bfloat16), a superset of those. Only they are
    recomputed (float64 dot products of the float32 descriptors, within ``err`` of the
    per-pair float32 values) and certified like :func:`_certified_float_matches`: the
    threshold test through ``_sq_distance_bounds``, the nearest neighbour by a gap
    ``> 2 err`` to the row's other entries, the reverse nearest neighbour by a gap ``>
    2 err`` to the column's other entries. Rows without entries are certainly not kept.

    Args:
        q: float32 [Nq, D] query descriptors.
        q_sq: float32 [Nq] their squared norms (``einsum("ij,ij->i", q, q)``).
        dbs: K non-empty database descriptor arrays [Nd_k, D].
        sq_threshold: squared L2 distance threshold (strict).
        mutual: also require mutual nearest neighbours.
        stats: optional counters (screened pairs and rows, open rows, entries).

    Returns:
        K items: (query_idx, db_idx) int64 arrays equal to the per-pair function's, or
        None where a decision is not certain or the screen does not apply (non-finite
        values, more than :data:`SCREEN_MAX_ENTRIES_PER_ROW` entries per query row).
    """
    nq, dim = q.shape
    q64 = q.astype(np.float64)
    q_norm = np.sqrt(q_sq.astype(np.float64))
    results: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(dbs)
    if not np.all(np.isfinite(q_sq)):
        return results
    upper = _screen_upper_similarity(q_sq, sq_threshold, dim)
    if mutual:
        upper = np.full(nq, upper.min())
    todo, prepared, cuts = [], [], []
    for k, db in enumerate(dbs):
        d, half_db_sq = _prepare_db(db, binary=False)
        half_max = float(half_db_sq.max())
        if not np.isfinite(half_max):
            continue
        err = similarity_error_bound(float(q_sq.max()), half_max, dim)
        screen_err = bfloat16_screen_error_bound(q_norm, np.sqrt(2.0 * half_max), dim)
        if mutual:
            screen_err = np.full(nq, screen_err.max())
        half_min = float(half_db_sq.min()) * (1.0 - 2.0 * _gamma(dim))
        todo.append(k)
        prepared.append((d, half_db_sq, err))
        cuts.append(upper - screen_err + half_min - err)
    if not todo:
        return results
    candidates = _screen_candidates(
        q,
        [prepared[n][0] for n in range(len(todo))],
        np.stack(cuts),
        SCREEN_MAX_ENTRIES_PER_ROW * nq,
    )
    for k, (d, half_db_sq, err), found in zip(todo, prepared, candidates):
        if stats is not None:
            stats.screened_pairs += 1
            stats.screened_rows += nq
        if found is None:
            continue
        q_rows, d_rows = found
        if stats is not None:
            stats.open_rows += np.unique(q_rows).size
            stats.screen_entries += q_rows.size
        results[k] = _certify_entries(
            q64, q_sq, d, half_db_sq, err, q_rows, d_rows, sq_threshold, mutual
        )
    return results


def _certify_entries(
    q64: np.ndarray,
    q_sq: np.ndarray,
    d: np.ndarray,
    half_db_sq: np.ndarray,
    err: float,
    q_rows: np.ndarray,
    d_rows: np.ndarray,
    sq_threshold: float,
    mutual: bool,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The certified decisions of :func:`screened_matches` for one image, or None."""
    if q_rows.size == 0:
        return _empty_matches()
    dim = q64.shape[1]
    values = np.einsum("ij,ij->i", q64[q_rows], d[d_rows].astype(np.float64))
    values -= half_db_sq[d_rows]
    # Per query row (entries sorted by row): best, its db row, second best.
    order = np.lexsort((-values, q_rows))
    rows_sorted, values_sorted, cols_sorted = q_rows[order], values[order], d_rows[order]
    first = np.flatnonzero(np.r_[True, rows_sorted[1:] != rows_sorted[:-1]])
    rows, best, nn1 = rows_sorted[first], values_sorted[first], cols_sorted[first]
    has_second = np.r_[first[1:], rows_sorted.size] - first > 1
    second = np.full(rows.size, -np.inf)
    second[has_second] = values_sorted[first[has_second] + 1]
    d1_low, d1_high = _sq_distance_bounds(q_sq[rows], best, err, dim)
    state = _tri_state(d1_high < sq_threshold, d1_low >= sq_threshold)
    open_rows = state != _FALSE
    state[open_rows & ~(best - second > 2.0 * err)] = _UNSURE
    if np.any(state == _UNSURE):
        return None
    if mutual and np.any(state == _TRUE):
        # Per db column: the best query row among its entries and the runner-up value.
        order = np.lexsort((-values, d_rows))
        cols_c, values_c, rows_c = d_rows[order], values[order], q_rows[order]
        first_c = np.flatnonzero(np.r_[True, cols_c[1:] != cols_c[:-1]])
        has_second_c = np.r_[first_c[1:], cols_c.size] - first_c > 1
        runner_up = np.full(first_c.size, -np.inf)
        runner_up[has_second_c] = values_c[first_c[has_second_c] + 1]
        kept = np.flatnonzero(state == _TRUE)
        pos = np.searchsorted(cols_c[first_c], nn1[kept])
        top_row, top = rows_c[first_c][pos], values_c[first_c][pos]
        other = np.where(top_row == rows[kept], runner_up[pos], top)
        mine = best[kept]
        mutual_state = _tri_state(mine - other > 2.0 * err, other - mine > 2.0 * err)
        if np.any(mutual_state == _UNSURE):
            return None
        state[kept] = mutual_state
    keep = state == _TRUE
    return rows[keep].astype(np.int64), nn1[keep].astype(np.int64)


def find_putative_matches_batch(
    query_descriptors: np.ndarray,
    db_descriptors: Sequence[np.ndarray],
    threshold: Optional[float] = DEFAULT_DESCRIPTOR_THRESHOLD,
    mutual: bool = False,
    ratio: Optional[float] = None,
    binary: bool = False,
    stats: Optional[BatchMatchStats] = None,
    screen: Optional[bool] = None,
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """:func:`find_putative_matches` of one query against many database images.

    Gives exactly the per-pair function's arrays for every image. The query is
    prepared once. Float descriptors: each image costs one float32 product
    ``[q, 1] @ [d, -|d|^2/2].T`` (no separate subtraction pass) and one argmax
    pass; since that product rounds differently from the per-pair one, every
    decision is certified against :func:`similarity_error_bound`, and an image
    with an uncertain decision (a near-tie such as duplicated descriptors, a
    distance at the threshold) is recomputed by the per-pair function.

    With a distance threshold and no ratio test, the bfloat16 screen (on by default
    where :func:`bfloat16_screen_error` finds it works) first computes every image's
    ``q . d`` by a bfloat16 product and keeps only the entries that
    :func:`bfloat16_screen_error_bound` cannot rule out (only pairs with ``q.d -
    |d|^2/2 > (|q|^2 - t^2)/2``, i.e. cosine > 0.5 for unit descriptors and t = 1, can
    match); those are recomputed and every decision certified
    (:func:`screened_matches`). An image with an uncertain decision takes the float32
    product above, then the per-pair function if needed. The result never depends
    on the screen, the CPU or the kernel used: only the time does.
    Binary descriptors: ±1 products are exact integers in float32 whatever the
    summation order, so the per-pair computation runs with the query unpacked
    once. Memory: like the per-pair function, at most
    :data:`MAX_DISTANCE_MATRIX_ENTRIES` similarities at once.

    Args:
        query_descriptors: as in :func:`find_putative_matches`.
        db_descriptors: sequence of database descriptor arrays (one per image).
        threshold, mutual, ratio, binary: as in :func:`find_putative_matches`.
        stats: optional counters, incremented (pairs, per-pair fallbacks, screen rows).
        screen: use the bfloat16 screen where it applies (float descriptors, a
            threshold, no ratio test): None = where it pays off
            (:func:`screen_pays_off`) and :func:`bfloat16_screen_error` is None;
            False = never; True = always where it applies, raise if that probe fails.

    Returns:
        One (query_idx, db_idx) pair of int64 arrays per database image.

    Raises:
        DescriptorMismatchError, ValueError: as :func:`find_putative_matches`,
            for the first offending image.
        RuntimeError: ``screen=True`` where the screen cannot run (names the reason).
    """
    pairs = [_validated_pair(query_descriptors, db, binary) for db in db_descriptors]
    if stats is not None:
        stats.pairs += len(pairs)
    results = [_empty_matches() for _ in pairs]
    todo = [k for k, (_, _, non_empty) in enumerate(pairs) if non_empty]
    if not todo:
        return results
    query = pairs[todo[0]][0]
    sq_threshold = _squared_threshold(threshold, binary, query.shape[1])
    q, q_offset = _prepare_query(query, binary)
    if binary:
        for k in todo:
            db = pairs[k][1]
            d, half_db_sq = _prepare_db(db, binary=True)
            nn1, d1, d2, best_q_for_db = _nearest_neighbours_prepared(
                q, q_offset, d, half_db_sq, True, ratio is not None, mutual
            )
            results[k] = _select_matches(
                nn1, d1, d2, best_q_for_db, db.shape[0], sq_threshold, mutual, ratio, True
            )
        return results
    q_aug = np.empty((q.shape[0], q.shape[1] + 1), dtype=np.float32)
    q_aug[:, :-1] = q
    q_aug[:, -1] = 1.0
    workspace = [np.empty(0, dtype=np.float32)]
    screened = {}
    worth_it = screen or screen_pays_off(q.shape, [pairs[k][1].shape[0] for k in todo])
    if screen is not False and worth_it:
        reason = bfloat16_screen_error()
        if reason is not None and screen:
            raise RuntimeError(
                f"find_putative_matches_batch(screen=True): the bfloat16 screen cannot run "
                f"here ({reason}); pass screen=None or False."
            )
        if reason is None and sq_threshold is not None and ratio is None:
            dbs = [pairs[k][1] for k in todo]
            got = screened_matches(q, q_offset, dbs, sq_threshold, mutual, stats)
            screened = {k: g for k, g in zip(todo, got) if g is not None}
    for k in todo:
        if k in screened:
            results[k] = screened[k]
            continue
        if stats is not None:
            stats.unscreened_pairs += 1
        got = _certified_float_matches(
            q_aug, q_offset, pairs[k][1], sq_threshold, mutual, ratio, workspace
        )
        if got is None:
            if stats is not None:
                stats.fallback_pairs += 1
            got = find_putative_matches(
                query, pairs[k][1], threshold=threshold, mutual=mutual, ratio=ratio
            )
        results[k] = got
    return results


def screen_pays_off(query_shape: Tuple[int, int], db_rows: Sequence[int]) -> bool:
    """True if the bfloat16 screen is expected to be faster than the float32 product.

    The default rule of ``find_putative_matches_batch(screen=None)``: dimension
    >= :data:`SCREEN_MIN_DIM` and on average >= :data:`SCREEN_MIN_MULTIPLY_ADDS_PER_IMAGE`
    multiply-adds per image (e.g. the paper's 1000 x 1000 x 128 descriptors; not 200
    features of 32 dimensions). Only speed depends on it, never the matches.

    Args:
        query_shape: (query rows, dimension).
        db_rows: database rows of each image.

    Returns:
        bool.
    """
    rows, dim = int(query_shape[0]), int(query_shape[1])
    if dim < SCREEN_MIN_DIM or not db_rows:
        return False
    mean_rows = float(np.mean(db_rows))
    return rows * mean_rows * dim >= SCREEN_MIN_MULTIPLY_ADDS_PER_IMAGE


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
