"""Validated configuration for ``python -m delg_tf.evaluate`` (no flags here).

The CLI (``delg_tf/evaluate.py``) converts its absl flags into these dataclasses;
library code only ever sees the dataclasses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

from delg_tf.configs import (
    MODEL_FAMILIES,
    ConfigError,
    expect,
    expect_choice,
    expect_int,
    is_int,
)
from delg_tf.evaluation.revisitop import DEFAULT_KAPPAS
from delg_tf.matching.pair import MatchingConfig
from delg_tf.retrieval.rerank import DEFAULT_NUM_WORKERS, DEFAULT_SHORTLIST_SIZE

FULL_RANKING = 0  # top_k value meaning "rank the whole database".
SEARCH_METHODS = ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf")  # retrieval.search.METHODS
GLDV2_TASKS = ("retrieval", "recognition")
DATASETS = ("embedded", "roxford5k", "rparis6k")
# Glocal Retriever (metric learning): Recall@K on the unseen test classes.
GLOCAL_DATASETS = ("cub", "embedded")
GLOCAL_DEFAULT_DATASET = "cub"
GLOCAL_RECALL_KS = (1, 2, 4, 8, 16, 32)
GLOCAL_DEFAULT_BATCH_SIZE = 32
DEFAULT_DATASET = "embedded"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Matching / re-ranking / metric settings.

    Each attribute but `matching` is the ``python -m delg_tf.evaluate`` flag of the same
    name (this section is their help).

    Attributes:
        shortlist_size: Top-k of the global ranking re-ranked (paper: 100).
        matching: local matching of a pair (validated by :class:`MatchingConfig`), from
            the flags of the same names: --descriptor_threshold,
            --ransac_residual_threshold, --ransac_iterations, --min_inliers,
            --use_ratio_test, --ratio_test_threshold, --binary_descriptors (re-rank with
            packed-bit DELG* descriptors, read from the stores' ``descriptors_binary``)
            and --seed (RANSAC, and the faiss IVF training).
        num_workers: Threads for re-ranking.
        kappas: k values for mP@k.
        allow_truncated_ranks: Accept rankings with fewer rows than the database
            (missing = not retrieved).
        search_method: Global search index: exact (numpy), faiss_flat, faiss_hnsw or
            faiss_ivf.
        top_k: 0: rank the whole database (revisitop layout [num_db, num_queries]);
            K > 0: keep the global top K per query (memory [K, num_queries], for +1M
            distractors) and score the truncated ranking.
    """

    shortlist_size: int = DEFAULT_SHORTLIST_SIZE
    matching: MatchingConfig = MatchingConfig()
    num_workers: int = DEFAULT_NUM_WORKERS
    kappas: Tuple[int, ...] = DEFAULT_KAPPAS
    allow_truncated_ranks: bool = False
    search_method: str = "exact"
    top_k: int = FULL_RANKING

    def __post_init__(self):
        expect(
            isinstance(self.matching, MatchingConfig),
            "matching",
            "a delg_tf.matching.pair.MatchingConfig",
            type(self.matching).__name__,
            owner="EvaluateConfig",
            fix="build one from the matching settings",
        )
        expect_choice("search_method", self.search_method, SEARCH_METHODS)
        expect_int("shortlist_size", self.shortlist_size, 0)
        expect(
            is_int(self.top_k)
            and (self.top_k == FULL_RANKING or self.top_k >= max(self.shortlist_size, 1)),
            "top_k",
            f"0 (full ranking) or an integer >= --shortlist_size={self.shortlist_size}",
            self.top_k,
        )
        expect_int("num_workers", self.num_workers, 1)
        expect(
            len(self.kappas) > 0 and all(is_int(k) and k >= 1 for k in self.kappas),
            "kappas",
            "a non-empty list of integers >= 1",
            self.kappas,
        )

    def record(self) -> dict:
        """The settings as one flat dict (the flag names), as written in results JSONs.

        The fields of ``matching`` take its place; ``mutual_nearest`` (no evaluate
        flag) is listed only when set, so the record of any CLI run has the keys
        of the flags.
        """
        out = {}
        for field in dataclasses.fields(self):
            if field.name != "matching":
                out[field.name] = getattr(self, field.name)
                continue
            for name, value in dataclasses.asdict(self.matching).items():
                if name != "mutual_nearest" or value:
                    out[name] = value
        return out


@dataclasses.dataclass(frozen=True)
class EvaluatePaths:
    """Input/output files of an evaluation run; what is given selects the mode.

    Modes (:attr:`mode`):

    * ``"gldv2"``: ``gldv2_solution`` + ``gldv2_predictions`` + ``gldv2_task``.
    * ``"ranking"``: ``gnd_path`` + ``ranks_path`` or ``scores_path``.
    * ``"features"``: ``gnd_path`` + ``db_features`` + ``query_features``.
    * ``"glocal"``: ``model_family="glocal"``: Recall@K of a Glocal Retriever run or
      export (``model_path``) on CUB-200-2011 or the embedded data (``dataset``).
    * ``"dataset"`` (everything else): end to end from a dataset folder
      (``dataset``, default the embedded data) and a model (``model_path`` /
      ``delf_config``) or already-extracted ``db_features``/``query_features``;
      see :mod:`delg_tf.evaluation.end_to_end`.

    Each attribute is the ``python -m delg_tf.evaluate`` flag of the same name (this
    section is their help).

    Attributes:
        gnd_path: Revisitop ground truth: gnd_roxford5k.pkl, gnd_rparis6k.pkl or .mat.
        output_json: Where to write the metrics JSON.
        ranks_path: ranks.npy, int [num_db, num_queries], column q = ranked db indices.
        scores_path: scores.npy, float [num_db, num_queries], higher = more similar.
        db_features: HDF5 feature store of the database images.
        query_features: HDF5 feature store of the queries cropped to their bbx.
        dataset: Dataset evaluated end to end: embedded, roxford5k or rparis6k
            (default: embedded); glocal: cub (default) or embedded.
        dataset_dir: Dataset folder: gnd_<dataset>.pkl/.mat and jpg/ (embedded: root).
        model_path: SavedModel used to extract features (glocal: a training logdir or an
            export).
        delf_config: DelfConfig .pbtxt used to extract features.
        cache_dir: Resumable feature cache (default: <output_json folder>/cache).
        distractor_list: +1M distractor list (paths relative to the jpg folder).
        gldv2_solution: GLDv2 solution CSV (retrieval or recognition).
        gldv2_predictions: GLDv2 submission CSV to score.
        gldv2_task: retrieval (mAP@100) or recognition (GAP).
        embedded_preset: Preset of the embedded data built without --dataset_dir.
        progress: Show progress bars.
        replace_stale_cache: Re-extract into --cache_dir when it holds features of
            another model.
        model_family: delg (retrieval protocols) or glocal (Recall@K on --dataset cub or
            embedded).
        checkpoint: glocal runs: checkpoint prefix (default latest).
        batch_size: glocal: images embedded at once.
    """

    gnd_path: Optional[Path] = None
    output_json: Optional[Path] = None
    ranks_path: Optional[Path] = None
    scores_path: Optional[Path] = None
    db_features: Optional[Path] = None
    query_features: Optional[Path] = None
    dataset: Optional[str] = None
    dataset_dir: Optional[Path] = None
    model_path: Optional[Path] = None
    delf_config: Optional[Path] = None
    cache_dir: Optional[Path] = None
    distractor_list: Optional[Path] = None
    gldv2_solution: Optional[Path] = None
    gldv2_predictions: Optional[Path] = None
    gldv2_task: Optional[str] = None
    embedded_preset: str = "default"
    progress: bool = True
    replace_stale_cache: bool = False
    model_family: str = "delg"
    checkpoint: Optional[str] = None
    batch_size: int = GLOCAL_DEFAULT_BATCH_SIZE

    _PATH_FIELDS = (
        "gnd_path",
        "output_json",
        "ranks_path",
        "scores_path",
        "db_features",
        "query_features",
        "dataset_dir",
        "model_path",
        "delf_config",
        "cache_dir",
        "distractor_list",
        "gldv2_solution",
        "gldv2_predictions",
    )

    def __post_init__(self):
        for name in self._PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and str(value) == "":
                object.__setattr__(self, name, None)
            elif value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
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
        expect_choice("model_family", self.model_family, MODEL_FAMILIES)
        mode = self.mode
        if mode == "glocal":
            self._check_glocal()
        elif mode == "gldv2":
            self._check_gldv2()
        elif mode in ("ranking", "features"):
            if self.gnd_path is None:
                raise ConfigError(
                    "--gnd_path is required with --ranks_path/--scores_path (gnd_roxford5k.pkl, "
                    "gnd_rparis6k.pkl or .mat); or pass --dataset and --dataset_dir instead."
                )
            if self.output_json is None:
                raise ConfigError("--output_json is required (where to write the metrics).")
        else:
            self._check_dataset()

    @property
    def mode(self) -> str:
        """``"glocal"``, ``"gldv2"``, ``"ranking"``, ``"features"`` or ``"dataset"``."""
        if self.model_family == "glocal":
            return "glocal"
        if (
            self.gldv2_solution is not None
            or self.gldv2_predictions is not None
            or self.gldv2_task is not None
        ):
            return "gldv2"
        if self.ranks_path is not None or self.scores_path is not None:
            return "ranking"
        if self.db_features is not None and self.gnd_path is not None and self.dataset is None:
            return "features"
        return "dataset"

    def _check_glocal(self):
        if self.model_path is None:
            raise ConfigError(
                "--model_family=glocal needs --model_path: a `python -m delg_tf.train "
                "--model_family=glocal` logdir or its `python -m delg_tf.export` folder."
            )
        expect(
            self.dataset is None or self.dataset in GLOCAL_DATASETS,
            "dataset",
            f"one of {GLOCAL_DATASETS} with --model_family=glocal",
            self.dataset,
        )
        unused = [
            f"--{n}"
            for n in ("gnd_path", "ranks_path", "scores_path", "db_features", "delf_config")
            if getattr(self, n) is not None
        ]
        if unused:
            raise ConfigError(
                f"{', '.join(unused)} do not apply to --model_family=glocal (Recall@K of "
                "--model_path on --dataset); drop them."
            )
        expect_int("batch_size", self.batch_size, 1)

    def _check_gldv2(self):
        if self.gldv2_solution is None or self.gldv2_predictions is None:
            raise ConfigError(
                "GLDv2 scoring needs both --gldv2_solution (e.g. retrieval_solution_v2.1.csv) "
                "and --gldv2_predictions (your submission CSV); received solution="
                f"{self.gldv2_solution}, predictions={self.gldv2_predictions}."
            )
        expect_choice(
            "gldv2_task",
            self.gldv2_task,
            GLDV2_TASKS,
            fix="use retrieval for mAP@100 or recognition for GAP",
        )
        others = [
            f"--{n}"
            for n in ("gnd_path", "dataset", "dataset_dir", "model_path", "delf_config")
            if getattr(self, n) is not None
        ]
        if others:
            raise ConfigError(
                f"GLDv2 scoring (--gldv2_*) does not use {others}; run them separately."
            )

    @property
    def dataset_name(self) -> str:
        """``dataset``, else guessed from ``gnd_<name>.pkl``, else the embedded default."""
        if self.dataset is not None:
            return self.dataset
        if self.gnd_path is not None:
            guess = self.gnd_path.stem.replace("gnd_", "", 1)
            if guess in DATASETS:
                return guess
        return DEFAULT_DATASET

    def _check_dataset(self):
        if self.dataset is not None:
            expect_choice("dataset", self.dataset, DATASETS)
        has_input = any(
            getattr(self, n) is not None
            for n in ("dataset", "dataset_dir", "model_path", "delf_config", "db_features")
        )
        if self.gnd_path is not None and not has_input:
            raise ConfigError(
                "nothing to evaluate: pass --ranks_path=ranks.npy or --scores_path=scores.npy "
                "(arrays [num_db, num_queries]), or --db_features and --query_features (HDF5 "
                "feature stores written by `python -m delg_tf.extract`), or --model_path to "
                "extract the images of the dataset (jpg/ next to --gnd_path)."
            )
        if self.gnd_path is not None and self.dataset is None and (
            self.gnd_path.stem.replace("gnd_", "", 1) not in DATASETS
        ):
            raise ConfigError(
                f"cannot tell the dataset from --gnd_path={self.gnd_path}; pass --dataset "
                f"(one of {DATASETS})."
            )
        dataset = self.dataset_name
        if dataset != DEFAULT_DATASET and self.dataset_dir is None and self.gnd_path is None:
            raise ConfigError(
                f"--dataset={dataset} needs --dataset_dir (the folder with gnd_{dataset}.pkl "
                "and jpg/); only --dataset=embedded is built automatically."
            )
        if self.model_path is not None and self.db_features is not None:
            raise ConfigError(
                "pass either a model (--model_path/--delf_config) to extract features, or "
                "already-extracted --db_features/--query_features, not both."
            )
