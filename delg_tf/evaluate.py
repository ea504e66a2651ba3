"""``python -m delg_tf.evaluate``: retrieval evaluation (Revisited Oxford/Paris, GLDv2).

End to end from a dataset folder and a model (extract with a resumable cache,
search, re-rank, print the global-only vs re-ranked table, write the JSON):

    python -m delg_tf.evaluate --model_path=export            # embedded default data
    python -m delg_tf.evaluate --dataset=roxford5k --dataset_dir=data/roxford5k \
        --model_path=export --cache_dir=cache/roxford5k --output_json=roxford5k.json
    python -m delg_tf.evaluate --dataset=roxford5k --dataset_dir=data/roxford5k \
        --delf_config=r50delg_gld_config.pbtxt --output_json=out.json

(library: :func:`delg_tf.evaluation.end_to_end.evaluate_dataset`). With
``--distractor_list`` (+1M) or ``--top_k=K`` the global search keeps the top K
per query (``--search_method=exact|faiss_flat|faiss_hnsw|faiss_ivf``) and the
truncated ranking is scored.

Precomputed ranking (revisitop layout, column q = ranked db indices of query q)
or similarity matrix (higher = more similar), both [num_db, num_queries]:

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --ranks_path=ranks.npy --output_json=out.json
    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --scores_path=scores.npy --output_json=out.json

Extracted features (HDF5 stores of ``delg_tf.extraction.store``):

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --db_features=db.h5 --query_features=queries.h5 --output_json=out.json

Post-processing of the global ranking (stores or end to end), in this order: DBA
(``--dba=K``), alphaQE (``--query_expansion=aqe --aqe_neighbours=n``), then the
re-ranker ``--rerank=none|ransac|superglobal|superglobal+ransac|diffusion|ransac_fused``
(default ransac, the paper's); the JSON's ``postprocessing`` lists what ran, its
parameters and ms/query per stage:

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl --db_features=db.h5 \
        --query_features=queries.h5 --dba=2 --query_expansion=aqe \
        --rerank=superglobal+ransac --output_json=out.json

Glocal Retriever (Recall@1, 2, 4, 8, 16, 32 on the unseen test classes; a training
logdir or an export):

    python -m delg_tf.evaluate --model_family=glocal --model_path=runs/glocal_cub \
        --dataset=cub --dataset_dir=/data/CUB_200_2011 --output_json=cub.json

GLDv2 (retrieval mAP@100 or recognition GAP, Public and Private):

    python -m delg_tf.evaluate --gldv2_task=retrieval \
        --gldv2_solution=retrieval_solution_v2.1.csv --gldv2_predictions=preds.csv

Flags live only in this module; they are converted into the validated
dataclasses of :mod:`delg_tf.evaluation.config` and passed to :func:`main`.
Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from delg_tf.configs import ConfigError, expect
from delg_tf.evaluation.config import (
    GLOCAL_DEFAULT_DATASET,
    GLOCAL_RECALL_KS,
    EvaluateConfig,
    EvaluatePaths,
)
from delg_tf.matching.pair import MatchingConfig

# Fields without a flag: the nested matching config (flags of its own fields) and the
# matching option the evaluation does not expose.
EVALUATE_NESTED = ("matching",)
MATCHING_WITHOUT_FLAG = ("mutual_nearest",)


def main(config: EvaluateConfig, paths: EvaluatePaths) -> Path:
    """Runs the evaluation selected by ``paths.mode`` and writes the JSON.

    Args:
        config: validated settings (matching thresholds, shortlist, kappas, search, ...).
        paths: what to evaluate (see :class:`EvaluatePaths`): a dataset and a model
            (``"dataset"``), a ranking/scores (``"ranking"``), feature stores
            (``"features"``) or GLDv2 CSVs (``"gldv2"``).

    Returns:
        Path of the JSON written (GLDv2: None when no --output_json was given). For a
        ranking: ``{"easy": {"mAP", "mP@1", "mP@5", "mP@10"}, "medium": ..., "hard": ...}``
        in percent; for features or a dataset: ``{"global": {...}, "reranked": {...},
        "ranking": ..., "config": ..., "timings": ...}``.

    Raises:
        ConfigError: inconsistent inputs (named by flag).
    """
    if paths.mode == "glocal":
        return _main_glocal(paths)
    if paths.mode == "gldv2":
        return _main_gldv2(paths)
    if paths.mode == "dataset":
        from delg_tf.evaluation.end_to_end import DatasetEvalConfig
        from delg_tf.evaluation.end_to_end import main as end_to_end_main

        def opt(value):
            return None if value is None else str(value)

        return end_to_end_main(
            DatasetEvalConfig(
                output_json=opt(paths.output_json),
                dataset=paths.dataset_name,
                dataset_dir=opt(paths.dataset_dir),
                gnd_path=opt(paths.gnd_path),
                model_path=opt(paths.model_path),
                delf_config=opt(paths.delf_config),
                db_features=opt(paths.db_features),
                query_features=opt(paths.query_features),
                cache_dir=opt(paths.cache_dir),
                distractor_list=opt(paths.distractor_list),
                embedded_preset=paths.embedded_preset,
                evaluate=config,
                progress=paths.progress,
                replace_stale_cache=paths.replace_stale_cache,
            )
        )
    if paths.db_features is not None:
        from delg_tf.evaluation.pipeline import evaluate_stores

        out = evaluate_stores(
            paths.gnd_path,
            paths.db_features,
            paths.query_features,
            config,
            paths.output_json,
            binary=config.matching.binary_descriptors,
        )
        print(f"wrote {out}")
        return out
    from delg_tf.data.revisitop import load_gnd
    from delg_tf.evaluation.ranks import load_array, score_ranking, write_json
    from delg_tf.evaluation.revisitop import format_results_table

    if paths.ranks_path is None and paths.scores_path is None:
        raise ConfigError(
            "nothing to evaluate: pass --ranks_path=ranks.npy or --scores_path=scores.npy "
            "(arrays [num_db, num_queries]), or --db_features and --query_features (HDF5 "
            "feature stores written by `python -m delg_tf.extract`)."
        )
    cfg = load_gnd(paths.gnd_path, require_bbx=False)
    num_db = len(cfg["imlist"])
    if paths.ranks_path is not None:
        results = score_ranking(
            cfg["gnd"],
            num_db,
            ranks=load_array(paths.ranks_path, "--ranks_path"),
            kappas=config.kappas,
            source=f"--ranks_path={paths.ranks_path}",
            allow_truncated=config.allow_truncated_ranks,
        )
    else:
        results = score_ranking(
            cfg["gnd"],
            num_db,
            scores=load_array(paths.scores_path, "--scores_path"),
            kappas=config.kappas,
            source=f"--scores_path={paths.scores_path}",
        )
    print(format_results_table({"ranking": results}, config.kappas))
    out = write_json(results, paths.output_json)
    print(f"wrote {out}")
    return out


def _main_glocal(paths: EvaluatePaths) -> Path:
    from delg_tf.evaluation.glocal import evaluate_glocal

    dataset = paths.dataset or GLOCAL_DEFAULT_DATASET
    results = evaluate_glocal(
        str(paths.model_path),
        dataset=dataset,
        data_dir=None if paths.dataset_dir is None else str(paths.dataset_dir),
        ks=GLOCAL_RECALL_KS,
        batch_size=paths.batch_size,
        checkpoint=paths.checkpoint,
        output_json=None if paths.output_json is None else str(paths.output_json),
        data_dir_flag="dataset_dir",
        model_flag="model_path",
    )
    recall = "  ".join(f"{k}={v:.2f}" for k, v in results["recall"].items())
    print(f"Glocal Retriever, {dataset} test classes ({results['num_images']} images): {recall}")
    print(f"wrote {results['output_json']}")
    return Path(results["output_json"])


def _main_gldv2(paths: EvaluatePaths):
    from delg_tf.evaluation import gldv2
    from delg_tf.evaluation.ranks import write_json

    for flag, path in (
        ("--gldv2_solution", paths.gldv2_solution),
        ("--gldv2_predictions", paths.gldv2_predictions),
    ):
        if not path.is_file():
            raise FileNotFoundError(f"{flag}: file not found: {path}")
    if paths.gldv2_task == gldv2.RETRIEVAL:
        results = gldv2.evaluate_retrieval_csv(paths.gldv2_solution, paths.gldv2_predictions)
    else:
        results = gldv2.evaluate_recognition_csv(paths.gldv2_solution, paths.gldv2_predictions)
    metric = next(iter(results["public"]))
    print(f"GLDv2 {paths.gldv2_task}: {metric}")
    for split in ("public", "private"):
        value = results[split][metric]
        shown = "n/a (no ground truth)" if value is None else f"{value:.2f}"
        print(f"{split:<10}{shown:>10}")
    if paths.output_json is None:
        return None
    out = write_json({"task": paths.gldv2_task, **results}, paths.output_json)
    print(f"wrote {out}")
    return out


def _define_flags():
    from delg_tf import cli as runner

    # Defaults = library defaults (paper values); strings, not enums: the configs
    # validate them (one-line error, exit code 2).
    runner.define_config_flags(EvaluatePaths)
    runner.define_config_flags(EvaluateConfig, skip=EVALUATE_NESTED)
    return runner.define_config_flags(MatchingConfig, skip=MATCHING_WITHOUT_FLAG)


def _config_from_flags(flag_values):
    from delg_tf import cli as runner

    try:
        matching = MatchingConfig(
            **runner.config_kwargs(MatchingConfig, flag_values, skip=MATCHING_WITHOUT_FLAG)
        )
    except ConfigError as e:  # named as its field: the flag of the same name.
        if e.field is None:
            raise
        expect(False, e.field, e.expected, e.received)
    config = EvaluateConfig(
        matching=matching,
        **runner.config_kwargs(EvaluateConfig, flag_values, skip=EVALUATE_NESTED),
    )
    paths = EvaluatePaths(**runner.config_kwargs(EvaluatePaths, flag_values))
    return config, paths


# ConfigError, GndFormatError, RankingShapeError, StoreError, DataError are ValueErrors;
# UnsafePickleError is an UnpicklingError; FileNotFoundError and PermissionError
# (unwritable --output_json / --cache_dir) are OSErrors.
EXPECTED_ERRORS = (ValueError, OSError, ImportError, pickle.UnpicklingError)


def _main_from_flags(flag_values):
    config, paths = _config_from_flags(flag_values)
    return main(config, paths)


def _parse_flags(argv):
    """Parses the flags; a malformed value (``--aqe_alpha=abc``) is one ``error:`` line."""
    from absl import flags

    from delg_tf import cli as runner

    def describe(error):
        return f"{runner.one_line(error)}; see python -m delg_tf.evaluate --helpfull."

    return runner.report_errors(
        flags.FLAGS,
        list(argv),
        expected_errors=[runner.ErrorRule((flags.Error,), runner.EXIT_USAGE_ERROR, describe)],
    )


def cli():
    """Console entry point."""
    from delg_tf import cli as runner
    from delg_tf.retrieval.index import quiet_faiss_loader

    quiet_faiss_loader()
    runner.run_main(
        _define_flags, _main_from_flags, expected_errors=EXPECTED_ERRORS, flags_parser=_parse_flags
    )


if __name__ == "__main__":
    cli()
