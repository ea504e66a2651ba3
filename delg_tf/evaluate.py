"""``python -m delg_tf.evaluate``: score retrieval results on Revisited Oxford/Paris.

Precomputed ranking (revisitop layout, column q = ranked db indices of query q):

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --ranks_path=ranks.npy --output_json=out.json

or a similarity matrix (higher = more similar), both [num_db, num_queries]:

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --scores_path=scores.npy --output_json=out.json

Flags live only in this module; they are converted into the validated
dataclasses of :mod:`delg_tf.evaluation.config` and passed to :func:`main`.
From extracted features (HDF5 stores of ``delg_tf.extraction.store``; global
search, top-100 RANSAC re-ranking, global-only vs re-ranked table):

    python -m delg_tf.evaluate --gnd_path=gnd_roxford5k.pkl \
        --db_features=db.h5 --query_features=queries.h5 --output_json=out.json

Extraction from a SavedModel is not wired here yet; the library function is
:func:`delg_tf.evaluation.pipeline.evaluate_features` (numpy arrays in).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from delg_tf.evaluation.config import ConfigError, EvaluateConfig, EvaluatePaths


def main(config: EvaluateConfig, paths: EvaluatePaths) -> Path:
    """Scores a precomputed ranking, or evaluates extracted features, and writes the JSON.

    Args:
        config: validated settings (matching thresholds, shortlist, kappas, ...).
        paths: gnd, ranking/scores or feature stores, and output paths.

    Returns:
        Path of the JSON written. For a ranking: ``{"easy": {"mAP", "mP@1",
        "mP@5", "mP@10"}, "medium": ..., "hard": ...}`` in percent; for feature
        stores: ``{"global": {...}, "reranked": {...}, "config": ..., "timings": ...}``.

    Raises:
        ConfigError: when neither a ranking/scores nor feature stores were given.
    """
    if paths.db_features is not None:
        from delg_tf.evaluation.pipeline import evaluate_stores

        out = evaluate_stores(
            paths.gnd_path,
            paths.db_features,
            paths.query_features,
            config,
            paths.output_json,
            binary=config.binary_descriptors,
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


def _define_flags():
    from absl import flags

    d = EvaluateConfig()  # flag defaults = library defaults (paper values).

    flags.DEFINE_string(
        "gnd_path", None, "Revisitop ground truth: gnd_roxford5k.pkl, gnd_rparis6k.pkl or .mat."
    )
    flags.DEFINE_string(
        "ranks_path", None, "ranks.npy, int [num_db, num_queries], column q = ranked db indices."
    )
    flags.DEFINE_string(
        "scores_path", None, "scores.npy, float [num_db, num_queries], higher = more similar."
    )
    flags.DEFINE_string("db_features", None, "HDF5 feature store of the database images.")
    flags.DEFINE_string(
        "query_features", None, "HDF5 feature store of the queries cropped to their bbx."
    )
    flags.DEFINE_boolean(
        "binary_descriptors",
        False,
        "Re-rank with packed-bit local descriptors (DELG*; use --descriptor_threshold=1.1).",
    )
    flags.DEFINE_string("output_json", None, "Where to write the metrics JSON.")
    flags.DEFINE_list("kappas", [str(k) for k in d.kappas], "k values for mP@k.")
    flags.DEFINE_boolean(
        "allow_truncated_ranks",
        False,
        "Accept rankings with fewer rows than the database (missing = not retrieved).",
    )
    flags.DEFINE_integer(
        "shortlist_size", d.shortlist_size, "Top-k of the global ranking re-ranked (paper: 100)."
    )
    flags.DEFINE_float(
        "descriptor_threshold",
        d.descriptor_threshold,
        "Putative match L2 threshold (paper: 1.0; DELG*: 1.1).",
    )
    flags.DEFINE_float(
        "ransac_residual_threshold",
        d.ransac_residual_threshold,
        "RANSAC residual threshold in px (paper: 20).",
    )
    flags.DEFINE_integer(
        "ransac_iterations", d.ransac_iterations, "RANSAC iterations (paper: 1000)."
    )
    flags.DEFINE_integer(
        "min_inliers", d.min_inliers, "Minimum inliers to count a match (paper: 0)."
    )
    flags.DEFINE_boolean(
        "use_ratio_test", False, "Select putative matches by Lowe's ratio test instead."
    )
    flags.DEFINE_float(
        "ratio_test_threshold", d.ratio_test_threshold, "Ratio for --use_ratio_test."
    )
    flags.DEFINE_integer("num_workers", d.num_workers, "Threads for re-ranking.")
    flags.DEFINE_integer("seed", d.seed, "RANSAC seed.")
    return flags.FLAGS


def _config_from_flags(flag_values):
    try:
        kappas = tuple(int(k) for k in flag_values.kappas)
    except ValueError as e:
        raise ConfigError(
            f"--kappas must be a comma-separated list of integers, got {flag_values.kappas}"
        ) from e
    config = EvaluateConfig(
        shortlist_size=flag_values.shortlist_size,
        descriptor_threshold=flag_values.descriptor_threshold,
        ransac_residual_threshold=flag_values.ransac_residual_threshold,
        ransac_iterations=flag_values.ransac_iterations,
        min_inliers=flag_values.min_inliers,
        use_ratio_test=flag_values.use_ratio_test,
        ratio_test_threshold=flag_values.ratio_test_threshold,
        num_workers=flag_values.num_workers,
        seed=flag_values.seed,
        kappas=kappas,
        allow_truncated_ranks=flag_values.allow_truncated_ranks,
        binary_descriptors=flag_values.binary_descriptors,
    )
    paths = EvaluatePaths(
        gnd_path=flag_values.gnd_path,
        output_json=flag_values.output_json,
        ranks_path=flag_values.ranks_path,
        scores_path=flag_values.scores_path,
        db_features=flag_values.db_features,
        query_features=flag_values.query_features,
    )
    return config, paths


def _run(argv):
    from absl import flags

    del argv
    try:
        config, paths = _config_from_flags(flags.FLAGS)
        main(config, paths)
    except (ValueError, FileNotFoundError, ImportError, pickle.UnpicklingError) as e:
        # ConfigError, GndFormatError, RankingShapeError are ValueErrors;
        # UnsafePickleError is an UnpicklingError.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli():
    """Console entry point."""
    from absl import app

    _define_flags()
    app.run(_run)


if __name__ == "__main__":
    cli()
