"""Export a trained DELG or Glocal model as a SavedModel: `python -m delg_tf.export`.

    python -m delg_tf.export --checkpoint_dir=LOGDIR --export_path=OUT [--overwrite] \
        [--delf_config=r50delg_gld_config.pbtxt] [--image_scales=0.25,...,2.0] \
        [--global_scales_ind=3,4,5] [--max_feature_num=1000] [--score_threshold=175] \
        [--max_image_size=1024] [--min_image_size=-1] [--use_square_images] \
        [--noexport_local | --noexport_global]

`--checkpoint_dir` is a `delg_tf.train` logdir (its `config.json` says how to
build the model; the latest checkpoint, or `--checkpoint`, is restored by
`delg_tf.training.runs.load_run`, for either family). The
export's `serving_default` signature is the official DELG one (see
`delg_tf.serving.delg_export`); the config values are the defaults baked into
the `serving_image_bytes` signature and `assets.extra/delf_config.pbtxt`
(start from `--delf_config`, then the individual flags override).

The model family is read from `config.json` (`train.model_family`). A Glocal
Retriever run (`--model_family=glocal`) is exported with
`delg_tf.serving.glocal_export.export_glocal` (image in, L2-normalised embedding
out, loadable with TensorFlow alone):

    python -m delg_tf.export --checkpoint_dir=LOGDIR --export_path=OUT [--overwrite] \
        [--checkpoint=PREFIX] [--image_size=N]

where inputs are resized to the run's training `--image_size` unless `--image_size`
says otherwise (0 = no resize). The DELG-only flags (`--delf_config`,
`--image_scales`, ...) are refused for a Glocal run, `--image_size` for a DELG run.

The library function is `main(config) -> Path`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

GLOCAL_FAMILY = "glocal"
NO_RESIZE = 0  # --image_size value: the Glocal export embeds images at their input size.
# Flags that only configure DELG exports (refused for a Glocal run when given).
DELG_ONLY_FLAGS = ("delf_config", "image_scales", "global_scales_ind", "max_feature_num",
                   "score_threshold", "iou_threshold", "max_image_size", "min_image_size",
                   "use_square_images", "export_local", "export_global", "warmup",
                   "fold_batch_norm", "compute_dtype")


class ExportConfigError(ValueError):
    """Invalid export configuration."""


@dataclasses.dataclass(frozen=True)
class ExportRunConfig:
    """Validated configuration of `python -m delg_tf.export`.

    Attributes:
      checkpoint_dir: training logdir with `config.json` and checkpoints.
      export_path: SavedModel directory to write.
      checkpoint: optional explicit checkpoint prefix (default: latest in checkpoint_dir).
      overwrite: replace an existing export.
      export: `delg_tf.serving.delg_export.ExportConfig` (what is baked in; DELG runs).
      image_size: Glocal runs: side inputs are resized to; None = the run's training
        image size, 0 = no resize. Must stay None for DELG runs.
      delg_options: names of DELG-only flags given on the command line (refused for a
        Glocal run).
      fold_batch_norm: DELG runs: export the batch-norm-folded graph (faster on CPU,
        same outputs up to float rounding; `delg_tf.extraction.folded`).
      compute_dtype: DELG runs: "float32" or "bfloat16" (backbone convolutions;
        needs fold_batch_norm; outside the official parity tolerances; faster only on
        CPUs with native bfloat16 -- AVX512_BF16 / AMX-BF16 -- and one warning line is
        logged when this machine emulates it, see
        `delg_tf.extraction.folded.warn_if_bfloat16_emulated`).
    """

    checkpoint_dir: str
    export_path: str
    export: object
    checkpoint: str = None
    overwrite: bool = False
    image_size: int = None
    delg_options: tuple = ()
    fold_batch_norm: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self):
        if not self.checkpoint_dir:
            raise ExportConfigError("--checkpoint_dir is required (a delg_tf.train logdir).")
        if not self.export_path:
            raise ExportConfigError("--export_path is required (the SavedModel directory).")
        if self.image_size is not None and (isinstance(self.image_size, bool)
                                            or not isinstance(self.image_size, int)
                                            or self.image_size < 0):
            raise ExportConfigError(f"--image_size must be an integer >= 0 (0 = no resize); "
                                    f"received {self.image_size!r}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ExportConfigError(f"--compute_dtype must be float32 or bfloat16, received "
                                    f"{self.compute_dtype!r}.")
        if self.compute_dtype != "float32" and not self.fold_batch_norm:
            raise ExportConfigError(f"--compute_dtype={self.compute_dtype} needs the folded "
                                    "graph; drop --nofold_batch_norm.")


def _load_run(config: ExportRunConfig):
    """The model of the run at `--checkpoint_dir` (`--checkpoint`, default the latest)."""
    from delg_tf.training import runs

    return runs.load_run(config.checkpoint_dir, config.checkpoint, flag="checkpoint_dir")


def _export_glocal_run(config: ExportRunConfig, record: dict) -> Path:
    """Glocal Retriever run -> embedding SavedModel (`export_glocal`)."""
    from delg_tf.serving import glocal_export

    if config.delg_options:
        given = ", ".join(f"--{name}" for name in config.delg_options)
        raise ExportConfigError(
            f"{given} configure DELG exports only, but --checkpoint_dir={config.checkpoint_dir}"
            f" is a glocal run; remove them (a Glocal export takes --image_size).")
    if config.image_size is None:
        image_size = record.get("train", {}).get("image_size")
    else:
        image_size = None if config.image_size == NO_RESIZE else config.image_size
    model = _load_run(config)
    path = glocal_export.export_glocal(model, config.export_path, image_size=image_size,
                                       overwrite=config.overwrite, run_record=record)
    resize = f"inputs resized to {image_size}x{image_size}" if image_size else "no resize"
    print(f"export: wrote {path} (glocal embedding [B, {model.config.embedding_dim}], "
          f"{resize}, signatures {glocal_export.SIGNATURE_IMAGES}, "
          f"{glocal_export.SIGNATURE_UINT8}, {glocal_export.SIGNATURE_ENCODED})")
    return path


def main(config: ExportRunConfig) -> Path:
    """Restores the trained model and writes the SavedModel. Returns its path."""
    if Path(config.export_path).exists() and not config.overwrite:
        # Checked before building anything (export_saved_model checks again).
        raise FileExistsError(
            f"export path {config.export_path} already exists; expected a new directory. "
            "Pass --overwrite to replace it, or choose another --export_path.")
    from delg_tf.training import runs

    record = runs.read_run_record(config.checkpoint_dir, flag="checkpoint_dir")
    if runs.run_family(record, runs.config_path(config.checkpoint_dir)) == GLOCAL_FAMILY:
        return _export_glocal_run(config, record)
    if config.image_size is not None:
        raise ExportConfigError(f"--image_size applies to Glocal runs only; "
                                f"--checkpoint_dir={config.checkpoint_dir} is a DELG run "
                                "(use --max_image_size/--image_scales).")
    from delg_tf.serving import delg_export

    model = _load_run(config)
    path = delg_export.export_saved_model(model, config.export_path, config.export,
                                          overwrite=config.overwrite,
                                          fold_batch_norm=config.fold_batch_norm,
                                          compute_dtype=config.compute_dtype)
    print(f"export: wrote {path} (mode {config.export.mode}, compute dtype "
          f"{config.compute_dtype}, signatures {delg_export.SIGNATURE_DEFAULT}, "
          f"{delg_export.SIGNATURE_IMAGE_BYTES})")
    return path


def _define_flags():
    from absl import flags

    flags.DEFINE_string("checkpoint_dir", None, "delg_tf.train logdir (config.json + ckpt-N).")
    flags.DEFINE_string("checkpoint", None, "Explicit checkpoint prefix (default: latest).")
    flags.DEFINE_string("export_path", None, "SavedModel directory to write.")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing export.")
    flags.DEFINE_string("delf_config", None, "DelfConfig .pbtxt giving the baked-in defaults.")
    flags.DEFINE_list("image_scales", None, "Pyramid scales (default 0.25 ... 2.0, 7 scales).")
    flags.DEFINE_list("global_scales_ind", None, "Scale indices of the global descriptor "
                      "(default 3,4,5).")
    flags.DEFINE_integer("max_feature_num", None, "Local features kept (default 1000).")
    flags.DEFINE_float("score_threshold", None, "Attention threshold (default 175.0, official).")
    flags.DEFINE_float("iou_threshold", None, "NMS IoU (default 1.0 = none).")
    flags.DEFINE_integer("max_image_size", None, "Resize larger images (default 1024; -1 none).")
    flags.DEFINE_integer("min_image_size", None, "Resize smaller images (default -1: none).")
    flags.DEFINE_boolean("use_square_images", None, "Resize images to squares.")
    flags.DEFINE_boolean("export_local", True, "Export local features.")
    flags.DEFINE_boolean("export_global", True, "Export global descriptors.")
    flags.DEFINE_boolean("warmup", True, "Write the TF Serving warm-up requests (DELG).")
    flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "DELG: dtype of "
                      "the backbone convolutions; bfloat16 is ~1.8x faster on CPUs with native "
                      "bfloat16 (AVX512_BF16 / AMX-BF16), likely slower than float32 where it is "
                      "emulated (e.g. AVX2-only; a warning says so), and not within the "
                      "official parity tolerances.")
    flags.DEFINE_boolean("fold_batch_norm", True, "DELG: export the graph with batch norm "
                         "folded into the convolutions (faster; --nofold_batch_norm keeps "
                         "the Keras layers).")
    flags.DEFINE_integer("image_size", None, "Glocal runs: resize inputs to this side "
                         "(default: the run's training --image_size; 0 = no resize).")
    return flags.FLAGS


def _config_from_flags(f):
    from delg_tf.extraction.config import load_delf_config
    from delg_tf.extraction import pyramid
    from delg_tf.extraction.config import ExportConfig

    if not (f.export_local or f.export_global):
        raise ExportConfigError("--noexport_local and --noexport_global together export "
                                "nothing; keep at least one.")
    mode = pyramid.mode_of(f.export_local, f.export_global)
    overrides = {"mode": mode, "warmup": f.warmup}
    try:
        if f.image_scales is not None:
            overrides["image_scales"] = tuple(float(s) for s in f.image_scales)
        if f.global_scales_ind is not None:
            overrides["global_scales_ind"] = tuple(int(i) for i in f.global_scales_ind)
    except ValueError as e:
        raise ExportConfigError(f"--image_scales must be floats and --global_scales_ind "
                                f"integers, comma-separated ({e}).") from e
    for name in ("max_feature_num", "score_threshold", "iou_threshold", "max_image_size",
                 "min_image_size", "use_square_images"):
        if getattr(f, name) is not None:
            overrides[name] = getattr(f, name)
    if f.delf_config:
        export = ExportConfig.from_delf_config(load_delf_config(f.delf_config), **overrides)
    else:
        export = ExportConfig(**overrides)
    delg_options = tuple(name for name in DELG_ONLY_FLAGS if f[name].present)
    return ExportRunConfig(checkpoint_dir=f.checkpoint_dir, export_path=f.export_path,
                           export=export, checkpoint=f.checkpoint, overwrite=f.overwrite,
                           image_size=f.image_size, delg_options=delg_options,
                           fold_batch_norm=f.fold_batch_norm, compute_dtype=f.compute_dtype)


def cli():
    """Console entry point."""
    from delg_tf import cli as runner

    runner.run_config_main(_define_flags, _config_from_flags, main)


if __name__ == "__main__":
    cli()
