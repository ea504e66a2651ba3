"""Validated configuration for ``python -m delg_tf.evaluate`` (no flags here).

The CLI (``delg_tf/evaluate.py``) converts its absl flags into these dataclasses;
library code only ever sees the dataclasses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from delg_tf.evaluation.revisitop import DEFAULT_KAPPAS

# Paper section 4.1 and Appendix B (retrieval datasets).
DEFAULT_SHORTLIST_SIZE = 100  # top-100 of the global ranking are re-ranked.
DEFAULT_DESCRIPTOR_THRESHOLD = 1.0  # L2 distance for float DELG descriptors.
DEFAULT_RANSAC_RESIDUAL_THRESHOLD = 20.0  # pixels.
DEFAULT_RANSAC_ITERATIONS = 1000
DEFAULT_MIN_INLIERS = 0  # any returned match counts for retrieval.


class ConfigError(ValueError):
    """An evaluation flag/config value is invalid."""


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Matching / re-ranking / metric settings.

    Attributes:
        shortlist_size: number of top global results re-ranked (flag --shortlist_size).
        descriptor_threshold: putative-match L2 distance threshold (--descriptor_threshold).
        ransac_residual_threshold: RANSAC inlier threshold in pixels (--ransac_residual_threshold).
        ransac_iterations: RANSAC trials (--ransac_iterations).
        min_inliers: below this many inliers a pair scores 0 (--min_inliers).
        use_ratio_test: use Lowe's ratio test instead of the distance threshold.
        ratio_test_threshold: ratio for the ratio test.
        num_workers: threads used for re-ranking (--num_workers).
        seed: RANSAC random seed (--seed).
        kappas: k values for mP@k.
        allow_truncated_ranks: accept rankings shorter than the database.
        binary_descriptors: re-rank with packed-bit local descriptors (DELG*).
    """

    shortlist_size: int = DEFAULT_SHORTLIST_SIZE
    descriptor_threshold: float = DEFAULT_DESCRIPTOR_THRESHOLD
    ransac_residual_threshold: float = DEFAULT_RANSAC_RESIDUAL_THRESHOLD
    ransac_iterations: int = DEFAULT_RANSAC_ITERATIONS
    min_inliers: int = DEFAULT_MIN_INLIERS
    use_ratio_test: bool = False
    ratio_test_threshold: float = 0.8
    num_workers: int = 2
    seed: int = 0
    kappas: Tuple[int, ...] = DEFAULT_KAPPAS
    allow_truncated_ranks: bool = False
    binary_descriptors: bool = False

    def __post_init__(self):
        checks = [
            (self.shortlist_size >= 0, "shortlist_size", "an integer >= 0"),
            (self.descriptor_threshold > 0, "descriptor_threshold", "a float > 0"),
            (self.ransac_residual_threshold > 0, "ransac_residual_threshold", "a float > 0"),
            (self.ransac_iterations >= 1, "ransac_iterations", "an integer >= 1"),
            (self.min_inliers >= 0, "min_inliers", "an integer >= 0"),
            (0 < self.ratio_test_threshold <= 1, "ratio_test_threshold", "a float in (0, 1]"),
            (self.num_workers >= 1, "num_workers", "an integer >= 1"),
            (
                len(self.kappas) > 0 and all(k >= 1 for k in self.kappas),
                "kappas",
                "a non-empty list of integers >= 1",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"--{name} must be {expected}, got {getattr(self, name)!r}.")


@dataclasses.dataclass(frozen=True)
class EvaluatePaths:
    """Input/output files for an evaluation run.

    Attributes:
        gnd_path: revisitop ground truth (.pkl or .mat) (--gnd_path).
        output_json: where the metrics JSON is written (--output_json).
        ranks_path: precomputed ranking .npy [num_db, num_queries] (--ranks_path).
        scores_path: precomputed similarities .npy [num_db, num_queries] (--scores_path).
        db_features: HDF5 feature store of the database images (--db_features).
        query_features: HDF5 feature store of the bbx-cropped queries (--query_features).
    """

    gnd_path: Path
    output_json: Path
    ranks_path: Optional[Path] = None
    scores_path: Optional[Path] = None
    db_features: Optional[Path] = None
    query_features: Optional[Path] = None

    def __post_init__(self):
        if self.gnd_path is None or str(self.gnd_path) == "":
            raise ConfigError(
                "--gnd_path is required (gnd_roxford5k.pkl, gnd_rparis6k.pkl or .mat)."
            )
        if self.output_json is None or str(self.output_json) == "":
            raise ConfigError("--output_json is required (where to write the metrics).")
        if self.ranks_path is not None and self.scores_path is not None:
            raise ConfigError("pass only one of --ranks_path and --scores_path, not both.")
        if (self.db_features is None) != (self.query_features is None):
            raise ConfigError(
                "pass both --db_features and --query_features (feature stores of the "
                "database and of the cropped queries), or neither."
            )
        if self.db_features is not None and (
            self.ranks_path is not None or self.scores_path is not None
        ):
            raise ConfigError(
                "pass either feature stores (--db_features/--query_features) or a "
                "precomputed ranking (--ranks_path/--scores_path), not both."
            )
        for name in (
            "gnd_path",
            "output_json",
            "ranks_path",
            "scores_path",
            "db_features",
            "query_features",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
