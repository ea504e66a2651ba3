"""Scoring a precomputed ranking (``ranks.npy`` / ``scores.npy``) with revisitop.

This is how users compare another system with delg_tf:

* ``ranks.npy``: int array [num_db, num_queries] (revisitop layout); column q
  lists every database index in ranked order (best first) for query q.
* ``scores.npy``: float array [num_db, num_queries]; higher = more similar.
  Converted to ranks with a stable descending sort (ties keep index order).

numpy only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from delg_tf.evaluation.revisitop import DEFAULT_KAPPAS, MISSING_ID, evaluate_revisitop


class RankingShapeError(ValueError):
    """A ranking or score matrix does not fit the ground truth."""


def scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    """Turns a similarity matrix into a revisitop ranking.

    Args:
        scores: float array [num_db, num_queries], higher = more similar.

    Returns:
        int64 array [num_db, num_queries]; column q = db indices by decreasing
        score (stable: equal scores keep ascending index order).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise RankingShapeError(
            f"scores must be 2-D [num_db, num_queries], got shape {scores.shape}."
        )
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(
        scores.dtype, np.complexfloating
    ):
        raise RankingShapeError(f"scores must be real numbers, got dtype {scores.dtype}.")
    if np.isnan(scores).any():
        raise RankingShapeError("scores contain NaN; replace them (e.g. with -inf) before ranking.")
    return np.argsort(-scores.astype(np.float64), axis=0, kind="stable").astype(np.int64)


def validate_ranks(
    ranks: np.ndarray,
    num_db: int,
    num_queries: int,
    source: str = "ranks",
    allow_truncated: bool = False,
) -> np.ndarray:
    """Checks that a ranking matches the ground truth.

    Args:
        ranks: array [R, num_queries] of database indices.
        num_db: database size from the ground truth.
        num_queries: number of queries from the ground truth.
        source: name used in error messages (file or flag).
        allow_truncated: accept R < num_db (missing positives count as not retrieved)
            and trailing ``MISSING_ID`` (-1) padding, as approximate top-k search returns.

    Returns:
        The ranking as int64.

    Raises:
        RankingShapeError: wrong dimensionality/shape, non-integer values,
            out-of-range indices or a database index repeated within a column.
    """
    ranks = np.asarray(ranks)
    expected = f"[num_db={num_db}, num_queries={num_queries}]"
    if ranks.ndim != 2:
        raise RankingShapeError(
            f"{source}: expected a 2-D array {expected}, got shape {ranks.shape}."
        )
    if ranks.shape == (num_queries, num_db) and ranks.shape != (num_db, num_queries):
        raise RankingShapeError(
            f"{source}: got shape {ranks.shape}, which looks transposed; expected {expected} "
            "(revisitop layout: column q = ranked database indices of query q). Save ranks.T."
        )
    rows_ok = ranks.shape[0] == num_db or (allow_truncated and 0 < ranks.shape[0] <= num_db)
    if ranks.shape[1] != num_queries or not rows_ok:
        raise RankingShapeError(
            f"{source}: expected shape {expected}, got {ranks.shape}. Check that the ranking "
            "was computed on the same dataset (and +1M distractors) as the ground truth."
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        if np.issubdtype(ranks.dtype, np.floating) and np.all(ranks == np.floor(ranks)):
            ranks = ranks.astype(np.int64)
        else:
            raise RankingShapeError(
                f"{source}: expected integer database indices, got dtype {ranks.dtype}. "
                "If these are similarity scores, pass them as scores (--scores_path)."
            )
    ranks = ranks.astype(np.int64)
    padding = ranks == MISSING_ID if allow_truncated else np.zeros(ranks.shape, bool)
    if padding.any():
        # -1 padding (approximate search) is only allowed after the valid entries.
        bad_cols = np.flatnonzero((np.diff(padding.astype(np.int8), axis=0) < 0).any(axis=0))
        if bad_cols.size:
            raise RankingShapeError(
                f"{source}: query column(s) {bad_cols[:5].tolist()} have {MISSING_ID} "
                "(missing result) before valid database indices; padding must come last."
            )
    valid = ranks[~padding]
    if valid.size and (valid.min() < 0 or valid.max() >= num_db):
        raise RankingShapeError(
            f"{source}: database indices must be in [0, {num_db}), got range "
            f"[{valid.min()}, {valid.max()}] (indices are 0-based"
            + (f"; {MISSING_ID} is allowed as trailing padding" if allow_truncated else "")
            + ")."
        )
    # Padding entries get distinct negative values so they are never duplicates.
    unique_pad = -2 - np.arange(ranks.size, dtype=np.int64).reshape(ranks.shape)
    sorted_cols = np.sort(np.where(padding, unique_pad, ranks), axis=0)
    dup_cols = np.flatnonzero((np.diff(sorted_cols, axis=0) == 0).any(axis=0))
    if dup_cols.size:
        raise RankingShapeError(
            f"{source}: query column(s) {dup_cols[:5].tolist()} list a database index more "
            "than once; each column must be a ranking without repeats."
        )
    return ranks


def load_array(path, what: str) -> np.ndarray:
    """Loads a .npy file without pickles (object arrays are refused).

    Args:
        path: .npy file.
        what: flag name for error messages, e.g. ``--ranks_path``.

    Returns:
        The array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise RankingShapeError(f"{what}: {path} is not a plain numeric .npy array ({e}).") from e


def score_ranking(
    gnd: Sequence[Mapping],
    num_db: int,
    ranks: Optional[np.ndarray] = None,
    scores: Optional[np.ndarray] = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    source: str = "ranks",
    allow_truncated: bool = False,
) -> dict:
    """Revisitop Easy/Medium/Hard metrics of a precomputed ranking or score matrix.

    Args:
        gnd: per-query ground truth (easy/hard/junk).
        num_db: database size.
        ranks: int [num_db, num_queries] ranking; exactly one of ranks/scores.
        scores: float [num_db, num_queries] similarities.
        kappas: k values for mP@k.
        source: name used in error messages.
        allow_truncated: accept rankings shorter than num_db.

    Returns:
        ``{"easy": {"mAP", "mP@1", "mP@5", "mP@10"}, "medium": ..., "hard": ...}`` in percent.
    """
    if (ranks is None) == (scores is None):
        raise ValueError("pass exactly one of ranks or scores.")
    if scores is not None:
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape != (num_db, len(gnd)):
            hint = (
                " (looks transposed; save scores.T)" if scores.shape == (len(gnd), num_db) else ""
            )
            raise RankingShapeError(
                f"{source}: expected scores of shape [num_db={num_db}, num_queries={len(gnd)}], "
                f"got {scores.shape}{hint}."
            )
        ranks = scores_to_ranks(scores)
    ranks = validate_ranks(ranks, num_db, len(gnd), source, allow_truncated)
    return evaluate_revisitop(ranks, gnd, kappas)


def write_json(results: Mapping, path) -> Path:
    """Writes metrics as JSON at full float precision (NaN written as null).

    Args:
        results: nested dict of floats.
        path: output file; parent folders are created.

    Returns:
        The path written.
    """

    def clean(x):
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (float, np.floating)):
            x = float(x)
            return None if math.isnan(x) else x
        if isinstance(x, np.integer):
            return int(x)
        return x

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean(results), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise OSError(
            f"--output_json={path}: cannot write the results ({e.strerror or e}); choose a "
            "path in a writable folder."
        ) from e
    return path
