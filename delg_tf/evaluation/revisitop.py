"""Revisited Oxford / Paris retrieval metrics, numerically identical to revisitop.

Reference protocol: Radenović et al., "Revisiting Oxford and Paris: Large-Scale
Image Retrieval Benchmarking", CVPR 2018 (used by DELG, Cao et al. ECCV 2020,
Tables 2-3). The numbers produced here match the authors' reference code
(github.com/filipradenovic/revisitop, ``python/evaluate.py``):

* AP is the area under the precision-recall curve with *trapezoidal*
  interpolation between consecutive positives; junk images are removed from the
  ranking before positions are counted (positions of positives are decreased by
  the number of junk images ranked before them).
* mP@k uses revisitop's convention ``kq = min(max(pos), k)`` and
  ``P = #(pos <= kq) / kq`` where ``pos`` are 1-based junk-free positions.
* Queries with no positives are excluded from the means (their AP is NaN).

Protocols (``PROTOCOLS``): Easy = easy positives, junk = junk + hard;
Medium = easy + hard positives, junk = junk; Hard = hard positives,
junk = junk + easy.

numpy only; no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

DEFAULT_KAPPAS = (1, 5, 10)  # revisitop reports mP@1, mP@5, mP@10.
PROTOCOLS = ("easy", "medium", "hard")
PERCENT = 100.0
MISSING_ID = -1  # padding in truncated rankings (faiss returns -1 for missing results).


def compute_ap(positive_positions: np.ndarray, num_positives: int) -> float:
    """Average precision with trapezoidal interpolation (revisitop ``compute_ap``).

    Args:
        positive_positions: int array [P], sorted 0-based positions of the
            positives in the junk-free ranking. Positives that were not ranked
            at all are simply absent (they contribute 0).
        num_positives: total number of positives of the query (> 0).

    Returns:
        AP in [0, 1].

    Raises:
        ValueError: if ``num_positives`` is not positive.
    """
    if num_positives <= 0:
        raise ValueError(
            f"compute_ap needs num_positives > 0, got {num_positives}; queries "
            "without positives must be excluded by the caller (compute_map does)."
        )
    ranks = np.asarray(positive_positions, dtype=np.float64)
    if ranks.size == 0:
        return 0.0
    j = np.arange(ranks.size, dtype=np.float64)
    # precision just before the j-th positive (1.0 when it is at position 0)
    # and just after it; the area of each trapezoid is their mean times 1/P.
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(ranks == 0, 1.0, j / np.where(ranks == 0, 1.0, ranks))
    precision_1 = (j + 1.0) / (ranks + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / num_positives)


def _junk_free_positions(
    ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray
) -> np.ndarray:
    """0-based positions of positives after removing junk from the ranking.

    Args:
        ranking: int array [N], database indices in ranked order.
        positives: int array of positive database indices.
        junk: int array of junk database indices.

    Returns:
        int64 array [P'] sorted, positions of the ranked positives with the
        number of junk images ranked before each positive subtracted.
    """
    pos = np.flatnonzero(np.isin(ranking, positives))
    if junk.size == 0 or pos.size == 0:
        return pos.astype(np.int64)
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    # revisitop counts junk strictly before each positive (pos > junk).
    num_junk_before = np.searchsorted(junk_pos, pos, side="left")
    return (pos - num_junk_before).astype(np.int64)


def precision_at_k(
    positions_1based: np.ndarray, kappas: Sequence[int], all_positives_ranked: bool = True
) -> np.ndarray:
    """Revisitop's precision@k for one query.

    Args:
        positions_1based: int array [P'] of 1-based junk-free positions.
        kappas: the k values.
        all_positives_ranked: False when the ranking is truncated and some
            positives lie beyond it. revisitop's ``kq = min(max(pos), k)`` then
            uses the unknown last position, which is beyond every ranked one, so
            ``kq = k``: exact whenever k <= the junk-free length of the truncated
            ranking (and a lower bound otherwise). Using the last *ranked*
            positive instead would overestimate P@k.

    Returns:
        float64 array [len(kappas)]. Defined as 0 when no positive is ranked
        (revisitop would crash on ``max`` of an empty array).
    """
    out = np.zeros(len(kappas), dtype=np.float64)
    if positions_1based.size == 0:
        return out
    last = int(positions_1based.max()) if all_positives_ranked else np.iinfo(np.int64).max
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(positions_1based <= kq) / kq
    return out


@dataclasses.dataclass
class MapResult:
    """Output of :func:`compute_map` (fractions, not percent).

    Attributes:
        mean_ap: mAP over queries with positives (NaN if there are none).
        aps: float64 [num_queries], per-query AP (NaN for excluded queries).
        mean_precisions: float64 [len(kappas)], mP@k.
        precisions: float64 [num_queries, len(kappas)], per-query P@k.
        kappas: the k values.
        num_evaluated: number of queries with at least one positive.
    """

    mean_ap: float
    aps: np.ndarray
    mean_precisions: np.ndarray
    precisions: np.ndarray
    kappas: tuple
    num_evaluated: int


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, np.ndarray]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> MapResult:
    """MAP and mP@k for a ranking (revisitop ``compute_map``).

    Args:
        ranks: int array [R, num_queries]; column q holds database indices in
            ranked order for query q (revisitop layout). ``R`` is normally the
            database size; a truncated ranking (R < num_db, e.g. a global top-k)
            is scored as if the missing positives were never retrieved: AP is
            then a lower bound, equal to the full ranking's AP when every
            positive is within the top R (see :func:`precision_at_k` for mP@k).
            Entries equal to ``MISSING_ID`` (-1, padding of approximate search
            results) match nothing.
        gnd: sequence of num_queries dicts with ``'ok'`` (positive indices) and
            optionally ``'junk'`` (indices ignored in the ranking).
        kappas: k values for mP@k.

    Returns:
        A :class:`MapResult`.

    Raises:
        ValueError: if ``ranks`` is not 2-D or its number of columns differs
            from ``len(gnd)``.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D [num_db, num_queries], got shape {ranks.shape}.")
    num_queries = len(gnd)
    if ranks.shape[1] != num_queries:
        raise ValueError(
            f"ranks has {ranks.shape[1]} columns but the ground truth has "
            f"{num_queries} queries; ranks must be [num_db, num_queries] "
            "(transpose it if you stored [num_queries, num_db])."
        )
    kappas = tuple(int(k) for k in kappas)
    aps = np.full(num_queries, np.nan)
    precisions = np.full((num_queries, len(kappas)), np.nan)
    for q in range(num_queries):
        positives = np.asarray(gnd[q]["ok"], dtype=np.int64).ravel()
        if positives.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", ()), dtype=np.int64).ravel()
        pos = _junk_free_positions(ranks[:, q], positives, junk)
        aps[q] = compute_ap(pos, positives.size)
        ranked = np.unique(positives).size == pos.size
        precisions[q] = precision_at_k(pos + 1, kappas, all_positives_ranked=ranked)
    evaluated = ~np.isnan(aps)
    num_evaluated = int(evaluated.sum())
    if num_evaluated:
        mean_ap = float(aps[evaluated].mean())
        mean_precisions = precisions[evaluated].mean(axis=0)
    else:
        mean_ap = float("nan")
        mean_precisions = np.full(len(kappas), np.nan)
    return MapResult(mean_ap, aps, mean_precisions, precisions, kappas, num_evaluated)


def protocol_gnd(gnd: Sequence[Mapping[str, np.ndarray]], protocol: str) -> list:
    """Builds revisitop's per-protocol ``{'ok', 'junk'}`` ground truth.

    Args:
        gnd: the dataset ground truth: dicts with ``'easy'``, ``'hard'``,
            ``'junk'`` index arrays (0-based).
        protocol: one of ``'easy'``, ``'medium'``, ``'hard'``.

    Returns:
        list of dicts ``{'ok': int64 array, 'junk': int64 array}``.

    Raises:
        ValueError: for an unknown protocol.
    """

    def arr(entry, key):
        return np.asarray(entry.get(key, ()), dtype=np.int64).ravel()

    out = []
    for entry in gnd:
        easy, hard, junk = arr(entry, "easy"), arr(entry, "hard"), arr(entry, "junk")
        if protocol == "easy":
            ok, bad = easy, np.concatenate([junk, hard])
        elif protocol == "medium":
            ok, bad = np.concatenate([easy, hard]), junk
        elif protocol == "hard":
            ok, bad = hard, np.concatenate([junk, easy])
        else:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}.")
        out.append({"ok": ok, "junk": bad})
    return out


def evaluate_revisitop(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, np.ndarray]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict:
    """Easy / Medium / Hard mAP and mP@k in percent.

    Args:
        ranks: int array [num_db, num_queries] (revisitop layout).
        gnd: dataset ground truth (dicts with ``easy``/``hard``/``junk``).
        kappas: k values for mP@k.

    Returns:
        ``{"easy": {"mAP": .., "mP@1": .., ...}, "medium": {...}, "hard": {...}}``
        with float percentages at full precision.
    """
    results = {}
    for protocol in PROTOCOLS:
        res = compute_map(ranks, protocol_gnd(gnd, protocol), kappas)
        entry = {"mAP": res.mean_ap * PERCENT}
        for k, p in zip(res.kappas, res.mean_precisions):
            entry[f"mP@{k}"] = float(p) * PERCENT
        results[protocol] = entry
    return results


def format_results_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> str:
    """Formats ``{row_name: evaluate_revisitop(...)}`` as a fixed-width table.

    Args:
        results: mapping from a row label (e.g. ``"global"``, ``"reranked"``)
            to the output of :func:`evaluate_revisitop`.
        kappas: the k values present in the results.

    Returns:
        A multi-line string; mAP and mP@k per protocol, two decimals.
    """
    metrics = ["mAP"] + [f"mP@{k}" for k in kappas]
    header = f"{'':<12}" + "".join(f"{(p + ' ' + m):>14}" for p in PROTOCOLS for m in metrics)
    lines = [header]
    for name, res in results.items():
        lines.append(
            f"{name:<12}" + "".join(f"{res[p][m]:>14.2f}" for p in PROTOCOLS for m in metrics)
        )
    return "\n".join(lines)
