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
    is_finite,
    is_int,
)
from delg_tf.evaluation.revisitop import DEFAULT_KAPPAS
from delg_tf.matching.pair import MatchingConfig
from delg_tf.retrieval import diffusion as diffusion_defaults
from delg_tf.retrieval import query_expansion as qe_defaults
from delg_tf.retrieval import superglobal as superglobal_defaults
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
# Post-processing of the global ranking (delg_tf.evaluation.pipeline.postprocess).
RERANK_NONE = "none"
RERANK_RANSAC = "ransac"  # the paper's: RANSAC inliers of the top shortlist_size.
RERANK_SUPERGLOBAL = "superglobal"
RERANK_SUPERGLOBAL_RANSAC = "superglobal+ransac"
RERANK_DIFFUSION = "diffusion"
RERANK_RANSAC_FUSED = "ransac_fused"  # significant inliers first, then global similarity.
RERANK_METHODS = (
    RERANK_NONE,
    RERANK_RANSAC,
    RERANK_SUPERGLOBAL,
    RERANK_SUPERGLOBAL_RANSAC,
    RERANK_DIFFUSION,
    RERANK_RANSAC_FUSED,
)
RANSAC_RERANKERS = (RERANK_RANSAC, RERANK_SUPERGLOBAL_RANSAC, RERANK_RANSAC_FUSED)
SUPERGLOBAL_RERANKERS = (RERANK_SUPERGLOBAL, RERANK_SUPERGLOBAL_RANSAC)
QUERY_EXPANSION_NONE = "none"
QUERY_EXPANSION_AQE = "aqe"
QUERY_EXPANSIONS = (QUERY_EXPANSION_NONE, QUERY_EXPANSION_AQE)
# alphaQE's n is tuned per dataset in Radenovic et al. (no paper default): a small one.
DEFAULT_AQE_NEIGHBOURS = 2
DBA_OFF = 0


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
        index_dir: A global index folder (python -m delg_tf.index over the database
            store) searched for the top --top_k instead of an index built from the
            descriptors with --search_method (needs --top_k > 0; not with --dba, which
            changes the indexed descriptors; alphaQE searches it again).
        rerank: Re-ranking of the global ranking: none; ransac (paper: the top
            --shortlist_size by RANSAC inliers, ties by global similarity);
            superglobal (SuperGlobal MDescAug + RerankwMDA of the top --superglobal_m,
            global descriptors only); superglobal+ransac (SuperGlobal of the top M, then
            RANSAC of the top --shortlist_size of that, ties in SuperGlobal order);
            diffusion (Iscen et al. diffusion on the database kNN graph, whole
            database, needs --top_k=0); ransac_fused (RANSAC inliers count only when
            significant for the pair, the others keep their global order; see
            delg_tf.retrieval.significance).
        query_expansion: none or aqe (alpha-weighted query expansion, Radenovic et al.
            TPAMI 2018), applied to the global ranking before --rerank.
        aqe_neighbours: aqe: database neighbours n added to each query (tuned per
            dataset in the paper).
        aqe_alpha: aqe: similarity exponent of the neighbour weights (paper: 3).
        dba: Database-side augmentation before the search: K neighbours added to each
            database descriptor with the aqe weights (0 = off).
        dba_alpha: DBA similarity exponent (paper: 3).
        superglobal_m: SuperGlobal shortlist M (paper: 400).
        superglobal_k: SuperGlobal neighbours K (paper: 9).
        superglobal_beta: SuperGlobal neighbour weight beta (paper: 0.15).
        diffusion_k: Diffusion kNN graph neighbours, the image itself included
            (paper: 50).
        diffusion_query_k: Diffusion: nonzeros of each query vector y (paper: 10).
        diffusion_gamma: Diffusion similarity exponent (paper: 3).
        diffusion_alpha: Diffusion parameter alpha in [0, 1) (paper: 0.99).
        diffusion_iterations: Diffusion conjugate-gradient iterations (paper code: 20).
        diffusion_tolerance: Diffusion conjugate-gradient relative residual (paper
            code: 1e-6).
    """

    shortlist_size: int = DEFAULT_SHORTLIST_SIZE
    matching: MatchingConfig = MatchingConfig()
    num_workers: int = DEFAULT_NUM_WORKERS
    kappas: Tuple[int, ...] = DEFAULT_KAPPAS
    allow_truncated_ranks: bool = False
    search_method: str = "exact"
    top_k: int = FULL_RANKING
    index_dir: str = ""
    rerank: str = RERANK_RANSAC
    query_expansion: str = QUERY_EXPANSION_NONE
    aqe_neighbours: int = DEFAULT_AQE_NEIGHBOURS
    aqe_alpha: float = qe_defaults.DEFAULT_ALPHA
    dba: int = DBA_OFF
    dba_alpha: float = qe_defaults.DEFAULT_ALPHA
    superglobal_m: int = superglobal_defaults.DEFAULT_TOP_M
    superglobal_k: int = superglobal_defaults.DEFAULT_NUM_NEIGHBORS
    superglobal_beta: float = superglobal_defaults.DEFAULT_BETA
    diffusion_k: int = diffusion_defaults.DEFAULT_GRAPH_NEIGHBORS
    diffusion_query_k: int = diffusion_defaults.DEFAULT_QUERY_NEIGHBORS
    diffusion_gamma: float = diffusion_defaults.DEFAULT_GAMMA
    diffusion_alpha: float = diffusion_defaults.DEFAULT_ALPHA
    diffusion_iterations: int = diffusion_defaults.DEFAULT_CG_ITERATIONS
    diffusion_tolerance: float = diffusion_defaults.DEFAULT_CG_TOLERANCE

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
        self._check_postprocessing()
        self._check_index()

    def _check_index(self):
        if not self.index_dir:
            return
        expect(
            self.top_k != FULL_RANKING,
            "top_k",
            "an integer > 0 with --index_dir (a faiss index returns each query's top k)",
            self.top_k,
            fix="set --top_k (e.g. 100, or >= --superglobal_m with --rerank=superglobal)",
        )
        expect(
            self.dba == DBA_OFF,
            "dba",
            "0 with --index_dir (DBA changes the database descriptors the index holds)",
            self.dba,
            fix="drop --index_dir to search the augmented descriptors, or --dba",
        )

    def _check_postprocessing(self):
        expect_choice("rerank", self.rerank, RERANK_METHODS)
        expect_choice("query_expansion", self.query_expansion, QUERY_EXPANSIONS)
        expect_int("aqe_neighbours", self.aqe_neighbours, 1)
        expect_int("dba", self.dba, 0, fix="0 turns database-side augmentation off")
        for name in ("aqe_alpha", "dba_alpha", "superglobal_beta", "diffusion_gamma"):
            value = getattr(self, name)
            expect(is_finite(value) and value >= 0, name, "a float >= 0", value)
        expect_int("superglobal_m", self.superglobal_m, 1)
        expect_int("superglobal_k", self.superglobal_k, 0)
        expect_int(
            "diffusion_k",
            self.diffusion_k,
            2,
            fix="the graph lists the image itself and k - 1 neighbours",
        )
        expect_int("diffusion_query_k", self.diffusion_query_k, 1)
        expect_int("diffusion_iterations", self.diffusion_iterations, 1)
        expect(
            is_finite(self.diffusion_alpha) and 0 <= self.diffusion_alpha < 1,
            "diffusion_alpha",
            "a float in [0, 1)",
            self.diffusion_alpha,
        )
        expect(
            is_finite(self.diffusion_tolerance) and self.diffusion_tolerance > 0,
            "diffusion_tolerance",
            "a float > 0",
            self.diffusion_tolerance,
        )
        if self.rerank == RERANK_DIFFUSION:
            expect(
                self.top_k == FULL_RANKING,
                "top_k",
                "0 with --rerank=diffusion (diffusion ranks the whole database; databases "
                "above the full-ranking limit are searched top-k)",
                self.top_k,
                fix="use --rerank=superglobal or ransac for a top-k search",
            )
        if self.rerank in SUPERGLOBAL_RERANKERS:
            expect(
                self.top_k == FULL_RANKING or self.top_k >= self.superglobal_m,
                "top_k",
                f"0 (full ranking) or an integer >= --superglobal_m={self.superglobal_m} "
                f"with --rerank={self.rerank}",
                self.top_k,
            )
        if self.rerank == RERANK_SUPERGLOBAL_RANSAC:
            expect(
                self.shortlist_size <= self.superglobal_m,
                "shortlist_size",
                f"<= --superglobal_m={self.superglobal_m} with --rerank={self.rerank} "
                "(RANSAC verifies the top of the SuperGlobal shortlist)",
                self.shortlist_size,
            )

    @property
    def uses_ransac(self) -> bool:
        """The re-ranker verifies local features (needs them and shortlist_size > 0)."""
        return self.rerank in RANSAC_RERANKERS

    def postprocessing_record(self) -> dict:
        """What :func:`delg_tf.evaluation.pipeline.postprocess` runs, with its parameters.

        ``{"dba": {"neighbours", "alpha"} | None, "query_expansion": {"method",
        "neighbours", "alpha"} | None, "rerank": {"method", ...its parameters}}``.
        """
        dba = None if self.dba == DBA_OFF else {"neighbours": self.dba, "alpha": self.dba_alpha}
        expansion = None
        if self.query_expansion == QUERY_EXPANSION_AQE:
            expansion = {
                "method": self.query_expansion,
                "neighbours": self.aqe_neighbours,
                "alpha": self.aqe_alpha,
            }
        rerank = {"method": self.rerank}
        if self.rerank in SUPERGLOBAL_RERANKERS:
            rerank["superglobal"] = {
                "m": self.superglobal_m,
                "k": self.superglobal_k,
                "beta": self.superglobal_beta,
            }
        if self.uses_ransac:
            rerank["ransac"] = {
                "shortlist_size": self.shortlist_size,
                "significant_only": self.rerank == RERANK_RANSAC_FUSED,
            }
        if self.rerank == RERANK_DIFFUSION:
            rerank["diffusion"] = {
                "graph_neighbours": self.diffusion_k,
                "query_neighbours": self.diffusion_query_k,
                "gamma": self.diffusion_gamma,
                "alpha": self.diffusion_alpha,
                "iterations": self.diffusion_iterations,
                "tolerance": self.diffusion_tolerance,
            }
        return {"dba": dba, "query_expansion": expansion, "rerank": rerank}

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
        if (
            self.gnd_path is not None
            and self.dataset is None
            and (self.gnd_path.stem.replace("gnd_", "", 1) not in DATASETS)
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
