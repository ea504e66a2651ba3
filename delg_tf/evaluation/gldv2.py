"""Google Landmarks Dataset v2 metrics and solution/prediction CSV readers.

Definitions follow the GLDv2 paper (Weyand et al., CVPR 2020) and its Kaggle
challenges, as implemented by the official DELF code
(``delf/python/datasets/google_landmarks_dataset/metrics.py`` and
``dataset_file_io.py``):

* Retrieval mAP@100: for each query, ``AP@100 = 1/min(m, 100) * sum_k P(k) rel(k)``
  over the first 100 predictions (duplicates skipped, still occupying their
  rank), ``m`` = number of ground-truth index images; averaged over *all*
  queries of the solution (queries without predictions score 0).
* Recognition GAP (micro-AP): one (landmark, score) prediction per test
  image; predictions sorted by score (descending; ties by image id, then
  class, ascending); ``GAP = 1/M * sum_i P(i) rel(i)``, ``M`` = number of test
  images with at least one ground-truth landmark. Predictions for non-landmark
  images count as wrong (they lower precision), unless
  ``ignore_non_gt_test_images``.

Solution CSVs (``retrieval_solution_v2.1.csv``: ``id,images,Usage``;
``recognition_solution_v2.1.csv``: ``id,landmarks,Usage``) have a header; Usage
is ``Public``, ``Private`` or ``Ignored``. numpy/stdlib only (no TensorFlow).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

DEFAULT_MAX_PREDICTIONS = 100  # mAP@100 (GLDv2-retrieval).
RECOGNITION = "recognition"
RETRIEVAL = "retrieval"
USAGES = ("Public", "Private", "Ignored")
SOLUTION_HEADERS = {RETRIEVAL: ("id", "images", "Usage"), RECOGNITION: ("id", "landmarks", "Usage")}
PREDICTION_HEADERS = {RETRIEVAL: ("id", "images"), RECOGNITION: ("id", "landmarks")}
RECOGNITION_PREDICTION_FIELDS = 2  # "<landmark_id> <score>"
PERCENT = 100.0


class Gldv2FormatError(ValueError):
    """A GLDv2 CSV file does not have the expected format."""


@dataclasses.dataclass
class Solution:
    """A parsed solution CSV.

    Attributes:
        public: test id -> ground-truth ids (index image ids (str) for
            retrieval, landmark ids (int) for recognition).
        private: same for the Private split.
        ignored: test ids ignored in scoring.
    """

    public: Dict[str, list]
    private: Dict[str, list]
    ignored: List[str]


def _check_task(task: str):
    if task not in (RETRIEVAL, RECOGNITION):
        raise ValueError(f"task must be '{RETRIEVAL}' or '{RECOGNITION}', got {task!r}.")


def _open_rows(path, task, headers, kind):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLDv2 {kind} file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise Gldv2FormatError(f"{path}: empty file; expected header {','.join(headers[task])}.")
    header = tuple(h.strip() for h in rows[0])
    if header[: len(headers[task])] != headers[task]:
        raise Gldv2FormatError(
            f"{path}: header {','.join(header)} does not match the {task} {kind} "
            f"format {','.join(headers[task])}."
        )
    return path, rows[1:]


def read_solution(path, task: str) -> Solution:
    """Reads a GLDv2 solution CSV.

    Args:
        path: ``retrieval_solution_v2.1.csv`` or ``recognition_solution_v2.1.csv``.
        task: ``"retrieval"`` or ``"recognition"``.

    Returns:
        Solution with Public/Private ground truth and the Ignored ids.

    Raises:
        Gldv2FormatError: bad header, wrong number of columns, unknown Usage,
            non-integer landmark id.
    """
    _check_task(task)
    path, rows = _open_rows(path, task, SOLUTION_HEADERS, "solution")
    public, private, ignored = {}, {}, []
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != 3:
            raise Gldv2FormatError(
                f"{path}:{line}: expected 3 columns (id, ids, Usage), got {len(row)}."
            )
        test_id, ids, usage = row[0], row[1].split(), row[2].strip()
        if usage not in USAGES:
            raise Gldv2FormatError(f"{path}:{line}: Usage must be one of {USAGES}, got {usage!r}.")
        if usage == "Ignored":
            ignored.append(test_id)
            continue
        if task == RECOGNITION:
            try:
                ids = [int(x) for x in ids]
            except ValueError as e:
                raise Gldv2FormatError(
                    f"{path}:{line}: landmark ids must be integers, got {row[1]!r}."
                ) from e
        (public if usage == "Public" else private)[test_id] = ids
    return Solution(public, private, ignored)


def read_predictions(path, task: str, solution: Solution) -> Tuple[dict, dict]:
    """Reads a GLDv2 submission CSV and splits it into Public/Private.

    Args:
        path: CSV with header ``id,images`` (retrieval; space-separated index
            ids) or ``id,landmarks`` (recognition; ``"<landmark> <score>"``).
        task: ``"retrieval"`` or ``"recognition"``.
        solution: the solution, to split ids and reject unknown ones.

    Returns:
        (public, private): test id -> list of index ids (retrieval) or
        ``{"class": int, "score": float}`` (recognition). Ignored ids dropped.

    Raises:
        Gldv2FormatError: repeated/unknown test id or malformed prediction.
    """
    _check_task(task)
    path, rows = _open_rows(path, task, PREDICTION_HEADERS, "predictions")
    ignored = set(solution.ignored)
    public, private, seen = {}, {}, set()
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        test_id = row[0]
        if test_id in seen:
            raise Gldv2FormatError(f"{path}:{line}: test image {test_id} is repeated.")
        seen.add(test_id)
        if test_id in ignored or len(row) < 2 or not row[1].strip():
            continue
        fields = row[1].split()
        if task == RECOGNITION:
            if len(fields) != RECOGNITION_PREDICTION_FIELDS:
                raise Gldv2FormatError(
                    f"{path}:{line}: expected '<landmark_id> <score>', got {row[1]!r}."
                )
            try:
                entry = {"class": int(fields[0]), "score": float(fields[1])}
            except ValueError as e:
                raise Gldv2FormatError(
                    f"{path}:{line}: bad landmark id or score in {row[1]!r}."
                ) from e
        else:
            entry = fields
        if test_id in solution.public:
            public[test_id] = entry
        elif test_id in solution.private:
            private[test_id] = entry
        else:
            raise Gldv2FormatError(f"{path}:{line}: test image {test_id} is not in the solution.")
    return public, private


def average_precision_at_k(
    prediction: Sequence[str],
    relevant: Sequence[str],
    max_predictions: int = DEFAULT_MAX_PREDICTIONS,
) -> float:
    """GLDv2 AP@k of one query.

    Args:
        prediction: ranked index ids.
        relevant: ground-truth index ids.
        max_predictions: k (100 for GLDv2-retrieval).

    Returns:
        AP@k in [0, 1]; 0 if ``relevant`` is empty.
    """
    relevant = set(relevant)
    if not relevant:
        return 0.0
    seen, correct, ap = set(), 0, 0.0
    for rank, image_id in enumerate(prediction[:max_predictions], start=1):
        if image_id in seen:
            continue  # duplicates are skipped but keep their rank.
        seen.add(image_id)
        if image_id in relevant:
            correct += 1
            ap += correct / rank
    return ap / min(len(relevant), max_predictions)


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = DEFAULT_MAX_PREDICTIONS,
) -> float:
    """GLDv2 retrieval mAP@k, averaged over all queries of ``solution``.

    Args:
        predictions: test id -> ranked index ids.
        solution: test id -> ground-truth index ids.
        max_predictions: k.

    Returns:
        mAP@k in [0, 1] (queries without predictions count as 0).

    Raises:
        ValueError: a predicted test id is not in the solution, or the solution is empty.
    """
    if not solution:
        raise ValueError("the retrieval solution is empty; nothing to average over.")
    unknown = [k for k in predictions if k not in solution]
    if unknown:
        raise ValueError(f"test image(s) {unknown[:5]} are not part of the retrieval solution.")
    total = sum(
        average_precision_at_k(pred, solution[key], max_predictions)
        for key, pred in predictions.items()
    )
    return total / len(solution)


def global_average_precision(
    predictions: Mapping[str, Mapping],
    solution: Mapping[str, Sequence[int]],
    ignore_non_gt_test_images: bool = False,
) -> float:
    """GLDv2 recognition GAP (micro-AP).

    Args:
        predictions: test id -> ``{"class": int, "score": float}`` (one per image).
        solution: test id -> ground-truth landmark ids (empty for non-landmarks).
        ignore_non_gt_test_images: skip predictions on non-landmark images
            (False for the official challenge metric).

    Returns:
        GAP in [0, 1].

    Raises:
        ValueError: no test image has a ground-truth landmark, or a predicted
            id is not in the solution.
    """
    num_positives = sum(1 for v in solution.values() if v)
    if num_positives == 0:
        raise ValueError("no test image of the solution has a landmark; GAP is undefined.")
    unknown = [k for k in predictions if k not in solution]
    if unknown:
        raise ValueError(f"test image(s) {unknown[:5]} are not part of the recognition solution.")
    ordered = sorted(predictions.items(), key=lambda item: (item[0], item[1]["class"]))
    ordered = sorted(ordered, key=lambda item: item[1]["score"], reverse=True)  # stable
    gap, total, correct = 0.0, 0, 0
    for key, pred in ordered:
        if ignore_non_gt_test_images and not solution[key]:
            continue
        total += 1
        if pred["class"] in solution[key]:
            correct += 1
            gap += correct / total
    return gap / num_positives


def evaluate_retrieval_csv(
    solution_path, predictions_path, max_predictions: int = DEFAULT_MAX_PREDICTIONS
) -> dict:
    """Public/Private mAP@k (percent) of a retrieval submission CSV.

    A split without queries in the solution (e.g. a Public-only file) scores None.
    """
    sol = read_solution(solution_path, RETRIEVAL)
    pub, priv = read_predictions(predictions_path, RETRIEVAL, sol)
    key = f"mAP@{max_predictions}"
    return {
        split: {
            key: (
                PERCENT * mean_average_precision(preds, truth, max_predictions) if truth else None
            )
        }
        for split, preds, truth in (("public", pub, sol.public), ("private", priv, sol.private))
    }


def evaluate_recognition_csv(solution_path, predictions_path) -> dict:
    """Public/Private GAP (percent) of a recognition submission CSV.

    A split where no test image has a landmark (GAP undefined) scores None.
    """
    sol = read_solution(solution_path, RECOGNITION)
    pub, priv = read_predictions(predictions_path, RECOGNITION, sol)
    return {
        split: {
            "GAP": (
                PERCENT * global_average_precision(preds, truth) if any(truth.values()) else None
            )
        }
        for split, preds, truth in (("public", pub, sol.public), ("private", priv, sol.private))
    }
