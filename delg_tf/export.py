"""Export a trained DELG or Glocal model as a SavedModel: `python -m delg_tf.export`.

    python -m delg_tf.export --checkpoint_dir=LOGDIR --export_path=OUT [--overwrite] \
        [--delf_config=r50delg_gld_config.pbtxt] [--image_scales=0.25,...,2.0] \
        [--global_scales_ind=3,4,5] [--max_feature_num=1000] [--score_threshold=175] \
        [--max_image_size=1024] [--min_image_size=-1] [--use_square_images] \
        [--noexport_local | --noexport_global] \
        [--superglobal=gem_plus,regional_gem,scale_gem,relu_plus | --superglobal=all]

`--checkpoint_dir` is a `delg_tf.train` logdir (its `config.json` says how to
build the model; the latest checkpoint, or `--checkpoint`, is restored by
`delg_tf.training.runs.load_run`, for either family). The
export's `serving_default` signature is the official DELG one (see
`delg_tf.serving.delg_export`); the config values are the defaults baked into
the `serving_image_bytes` signature and `assets.extra/delf_config.pbtxt`
(start from `--delf_config`, then the individual flags override).
`--superglobal` bakes SuperGlobal pooling modules (Shao et al. ICCV 2023) into the
global descriptor (`delg_tf.extraction.superglobal`; recorded in
`assets.extra/delg_tf_superglobal.json`); default none, the DELG pooling.

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

from delg_tf.configs import ConfigError, expect, expect_choice, is_int, require
from delg_tf.locking import output_lock, sibling_lock_file

GLOCAL_FAMILY = "glocal"
NO_RESIZE = 0  # --image_size value: the Glocal export embeds images at their input size.
# --compute_dtype values (`delg_tf.extraction.folded.COMPUTE_DTYPES`, which imports TF).
COMPUTE_DTYPES = ("float32", "bfloat16")
# Fields of the run config without a flag of their own: the nested extraction config
# (from --delf_config and the flags of its fields) and the DELG-only flags given.
NESTED_FIELDS = ("export", "delg_options")
# Flags that only configure DELG exports (refused for a Glocal run when given).
DELG_ONLY_FLAGS = (
    "delf_config",
    "image_scales",
    "global_scales_ind",
    "max_feature_num",
    "score_threshold",
    "iou_threshold",
    "max_image_size",
    "min_image_size",
    "use_square_images",
    "export_local",
    "export_global",
    "warmup",
    "fold_batch_norm",
    "compute_dtype",
    "superglobal",
)


@dataclasses.dataclass(frozen=True)
class ExportRunConfig:
    """Validated configuration of `python -m delg_tf.export`.

    Each attribute but `export` and `delg_options` is the flag of the same name (this
    section is their help).

    Attributes:
      checkpoint_dir: delg_tf.train logdir (config.json + ckpt-N).
      export_path: SavedModel directory to write.
      export: `delg_tf.extraction.config.ExportConfig` (what is baked in; DELG runs):
        from --delf_config, then the flags of its fields.
      checkpoint: Explicit checkpoint prefix (default: the latest in --checkpoint_dir).
      overwrite: Replace an existing export.
      image_size: Glocal runs: resize inputs to this side (default: the run's training
        --image_size; 0 = no resize). Unset for DELG runs.
      delg_options: names of DELG-only flags given on the command line (refused for a
        Glocal run).
      fold_batch_norm: DELG: export the graph with batch norm folded into the
        convolutions (faster on CPU, same outputs up to float rounding;
        --nofold_batch_norm keeps the Keras layers).
      compute_dtype: DELG: dtype of the backbone convolutions (bfloat16 needs
        --fold_batch_norm); bfloat16 is ~1.8x faster on CPUs with native bfloat16
        (AVX512_BF16 / AMX-BF16), likely slower than float32 where it is emulated (e.g.
        AVX2-only; a warning says so, `delg_tf.extraction.folded`), and not within the
        official parity tolerances.
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
        require(self.checkpoint_dir, "checkpoint_dir", "a delg_tf.train logdir")
        require(self.export_path, "export_path", "the SavedModel directory")
        expect(
            self.image_size is None or (is_int(self.image_size) and self.image_size >= 0),
            "image_size",
            "an integer >= 0 (0 = no resize)",
            self.image_size,
        )
        expect_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.compute_dtype != "float32" and not self.fold_batch_norm:
            raise ConfigError(
                f"--compute_dtype={self.compute_dtype} needs the folded graph; "
                "drop --nofold_batch_norm.",
                "compute_dtype",
            )


def _load_run(config: ExportRunConfig):
    """The model of the run at `--checkpoint_dir` (`--checkpoint`, default the latest)."""
    from delg_tf.training import runs

    return runs.load_run(config.checkpoint_dir, config.checkpoint, flag="checkpoint_dir")


def _export_glocal_run(config: ExportRunConfig, record: dict) -> Path:
    """Glocal Retriever run -> embedding SavedModel (`export_glocal`)."""
    from delg_tf.serving import glocal_export

    if config.delg_options:
        given = ", ".join(f"--{name}" for name in config.delg_options)
        raise ConfigError(
            f"{given} configure DELG exports only, but --checkpoint_dir={config.checkpoint_dir}"
            f" is a glocal run; remove them (a Glocal export takes --image_size)."
        )
    if config.image_size is None:
        image_size = record.get("train", {}).get("image_size")
    else:
        image_size = None if config.image_size == NO_RESIZE else config.image_size
    model = _load_run(config)
    path = glocal_export.export_glocal(
        model,
        config.export_path,
        image_size=image_size,
        overwrite=config.overwrite,
        run_record=record,
    )
    resize = f"inputs resized to {image_size}x{image_size}" if image_size else "no resize"
    print(
        f"export: wrote {path} (glocal embedding [B, {model.config.embedding_dim}], "
        f"{resize}, signatures {glocal_export.SIGNATURE_IMAGES}, "
        f"{glocal_export.SIGNATURE_UINT8}, {glocal_export.SIGNATURE_ENCODED})"
    )
    return path


def main(config: ExportRunConfig) -> Path:
    """Restores the trained model and writes the SavedModel. Returns its path.

    One export per path at a time: it holds the lock file `.<name>.lock` beside
    `--export_path` (`delg_tf.locking`; the export folder itself appears by a rename) from
    the first check to the rename; another export to that path refuses (`LockedError`).
    """
    lock_file = sibling_lock_file(config.export_path)
    with output_lock(lock_file, f"--export_path={config.export_path}", name=None):
        return _export(config)


def _export(config: ExportRunConfig) -> Path:
    """`main` once the export path is locked."""
    if Path(config.export_path).exists() and not config.overwrite:
        # Checked before building anything (export_saved_model checks again).
        raise FileExistsError(
            f"export path {config.export_path} already exists; expected a new directory. "
            "Pass --overwrite to replace it, or choose another --export_path."
        )
    from delg_tf.training import runs

    record = runs.read_run_record(config.checkpoint_dir, flag="checkpoint_dir")
    if runs.run_family(record, runs.config_path(config.checkpoint_dir)) == GLOCAL_FAMILY:
        return _export_glocal_run(config, record)
    if config.image_size is not None:
        raise ConfigError(
            f"--image_size applies to Glocal runs only; --checkpoint_dir="
            f"{config.checkpoint_dir} is a DELG run (use --max_image_size/"
            "--image_scales).",
            "image_size",
        )
    from delg_tf.serving import delg_export

    model = _load_run(config)
    path = delg_export.export_saved_model(
        model,
        config.export_path,
        config.export,
        overwrite=config.overwrite,
        fold_batch_norm=config.fold_batch_norm,
        compute_dtype=config.compute_dtype,
    )
    superglobal = ",".join(config.export.superglobal) or "none"
    print(
        f"export: wrote {path} (mode {config.export.mode}, compute dtype "
        f"{config.compute_dtype}, superglobal {superglobal}, signatures "
        f"{delg_export.SIGNATURE_DEFAULT}, {delg_export.SIGNATURE_IMAGE_BYTES})"
    )
    return path


def _define_flags():
    from absl import flags

    from delg_tf import cli as runner
    from delg_tf.extraction.config import ExportConfig

    runner.define_config_flags(
        ExportRunConfig, skip=NESTED_FIELDS, choices={"compute_dtype": COMPUTE_DTYPES}
    )
    flags.DEFINE_string("delf_config", None, "DelfConfig .pbtxt giving the baked-in defaults.")
    # The fields of the nested ExportConfig: unset flags keep the --delf_config values.
    runner.define_config_flags(ExportConfig, skip=("mode",), unset=True)
    flags.DEFINE_boolean("export_local", True, "Export local features.")
    flags.DEFINE_boolean("export_global", True, "Export global descriptors.")
    return flags.FLAGS


def _config_from_flags(f):
    from delg_tf import cli as runner
    from delg_tf.extraction.config import ExportConfig, load_delf_config, mode_of

    if not (f.export_local or f.export_global):
        raise ConfigError(
            "--noexport_local and --noexport_global together export nothing; keep at least one."
        )
    overrides = {
        "mode": mode_of(f.export_local, f.export_global),
        **runner.config_kwargs(ExportConfig, f, skip=("mode",), unset=True),
    }
    if f.delf_config:
        export = ExportConfig.from_delf_config(load_delf_config(f.delf_config), **overrides)
    else:
        export = ExportConfig(**overrides)
    delg_options = tuple(name for name in DELG_ONLY_FLAGS if f[name].present)
    return ExportRunConfig(
        export=export,
        delg_options=delg_options,
        **runner.config_kwargs(ExportRunConfig, f, skip=NESTED_FIELDS),
    )


def cli():
    """Console entry point."""
    from delg_tf import cli as runner

    runner.run_config_main(_define_flags, _config_from_flags, main)


if __name__ == "__main__":
    cli()
