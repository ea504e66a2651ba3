"""``python -m delg_tf.convert_official``: official DELG SavedModel -> trainable delg_tf model.

    python -m delg_tf.convert_official --model_path=r50delg_gld_20200814 \
        --output_dir=converted/r50delg_gld [--backbone=r50|r101]

Reads the official variables (TF1 tf-slim release or TF2 official export),
builds a `DelgModel` with the official numerics, prints the variable mapping,
self-checks the converted model against the official SavedModel on skimage
photos (refusing to write anything if it does not match), then writes
OUT/checkpoint/ (fine-tune with ``python -m delg_tf.train --init_from=OUT/checkpoint``),
OUT/model_config.json, OUT/conversion.json and OUT/saved_model/ (usable as
``model_path`` in a DelfConfig). Flags live only here; the library function is
`delg_tf.official.convert.convert`.
"""

import os
from pathlib import Path

# Before TensorFlow is imported: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from delg_tf.official.convert import ConvertConfig, convert  # noqa: E402


def main(config: ConvertConfig) -> Path:
    """Runs the conversion; returns the output directory."""
    return convert(config)


def _define_flags():
    from absl import flags

    flags.DEFINE_string(
        "model_path",
        None,
        "Official DELG SavedModel directory (saved_model.pb "
        "and variables/), e.g. the extracted r50delg_gld_20200814 tarball.",
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Where to write checkpoint/, saved_model/, model_config.json and conversion.json.",
    )
    flags.DEFINE_enum("backbone", None, ["r50", "r101"], "ResNet depth; inferred if unset.")
    flags.DEFINE_boolean("overwrite", False, "Replace a non-empty --output_dir.")
    flags.DEFINE_list(
        "self_check_images",
        ["chelsea", "coffee", "astronaut"],
        "skimage.data photos used by the self-check.",
    )
    flags.DEFINE_integer("self_check_max_side", 320, "Self-check photos are shrunk to this side.")
    flags.DEFINE_boolean("export", True, "Also write OUT/saved_model (a delg_tf export).")
    return flags.FLAGS


def _config_from_flags(flag_values) -> ConvertConfig:
    return ConvertConfig(
        model_path=flag_values.model_path,
        output_dir=flag_values.output_dir,
        backbone=flag_values.backbone,
        overwrite=flag_values.overwrite,
        self_check_images=tuple(flag_values.self_check_images),
        self_check_max_side=flag_values.self_check_max_side,
        export=flag_values.export,
    ).validate()


def cli():
    """Console entry point (`delg-convert-official`)."""
    from delg_tf import cli as runner

    runner.run_config_main(_define_flags, _config_from_flags, main)


if __name__ == "__main__":
    cli()
