r"""DELG extraction as an Apache Beam pipeline: `python -m delg_tf.extract_beam`.

    python -m delg_tf.extract_beam --images=GLOB|FOLDER|LIST.txt --output_dir=OUT \
        --model_path=SAVED_MODEL [--delf_config=r50delg_gld_config.pbtxt] \
        [--float16] [--binarize] [--images_per_shard=256] [--model_copies=0] \
        [Beam pipeline options: --runner=DirectRunner --direct_num_workers=2
         --direct_running_mode=multi_processing | --runner=DataflowRunner ... | ...]

* Flags this module does not define are Apache Beam pipeline options (given as
  `--name=value` or `--name value`); one that Beam does not know either is refused.
  `--runner=DirectRunner` (Beam's default) runs on Beam's FnApiRunner here, in-process
  or with `--direct_running_mode=multi_processing --direct_num_workers=N` (the
  DirectRunner would first try the PrismRunner, which downloads a binary).
* Images, model and features: those of `python -m delg_tf.extract` (same image
  decoding, host-side resize and extractor, so the same features), read through Beam's
  `FileSystems`: local paths, or gs:// / s3:// ... with the matching Beam extra.
* Output `OUT/`: `shards/*.h5` (HDF5 store files; `FeatureStore(shard_files(OUT))` opens
  them as one store), `manifest.json` (shard -> image names) and `errors.tsv` (the
  unreadable images of this run, in `delg_tf.extract`'s format). A rerun extracts only
  the images not in a complete shard.
* Exit codes: 0 if at least one image is in the output; `EXIT_RUN_ERROR` (3) with one
  `error:` line if every image failed; 2 for bad flags, a missing model or input. A
  failing pipeline (e.g. the model raising on a readable image) raises Beam's error.

See `delg_tf.extraction.beam` for the pipeline; docs/readme_extraction.md, "Extraction
with Apache Beam", for the runners (Dataflow, Flink, Spark) and their workers.
The library function is `main(config) -> Path` (the manifest).
"""

from __future__ import annotations

import logging
from pathlib import Path

from delg_tf import extract

BEAM_MISSING = (
    "apache-beam is not installed; `pip install 'delg_tf[beam]'` (plus "
    "apache-beam[gcp] for Dataflow) to run python -m delg_tf.extract_beam."
)
NOT_FLAGS = ("pipeline_args",)  # BeamExtractConfig fields without a flag of this module
# Beam logs every bundle and worker message at INFO (absl shows INFO): warnings only.
BEAM_LOG_LEVEL = logging.WARNING


def _beam_lib():
    try:
        from delg_tf.extraction import beam as beam_lib
    except ImportError as e:
        if "apache_beam" not in str(e):
            raise
        raise ModuleNotFoundError(BEAM_MISSING) from e
    return beam_lib


def main(config) -> Path:
    """Runs the extraction of `config` (`delg_tf.extraction.beam.BeamExtractConfig`).

    Returns:
      Path of `OUT/manifest.json` (a str for a non-local --output_dir such as gs://...).

    Raises:
      ConfigError / StoreError / FileNotFoundError: bad inputs, output or model.
      ExtractOutputError: a local --output_dir that cannot be written.
      NoImageExtractedError: every image failed (see OUT/errors.tsv).
    """
    beam_lib = _beam_lib()
    try:
        manifest = beam_lib.run(config)
    except OSError as e:
        output_error = (
            extract.output_dir_error(e, config.output_dir)
            if beam_lib.is_local(config.output_dir)
            else None
        )
        if output_error is None:
            raise
        raise output_error from e
    return Path(manifest) if beam_lib.is_local(manifest) else manifest


def _define_flags():
    from delg_tf import cli as runner

    try:
        config_class = _beam_lib().BeamExtractConfig
    except ModuleNotFoundError as e:
        runner.fail(e)
    return runner.define_config_flags(config_class, skip=NOT_FLAGS)


def _parse_flags(argv, pipeline_args):
    """Absl parse of this module's flags; the other arguments go to `pipeline_args`."""
    from absl import flags

    from delg_tf import cli as runner

    try:
        rest = flags.FLAGS(list(argv), known_only=True)
    except flags.Error as e:
        runner.fail(e)
    pipeline_args[:] = rest[1:]
    return rest[:1]


def _config_from_flags(flag_values, pipeline_args):
    from delg_tf import cli as runner

    beam_lib = _beam_lib()
    return beam_lib.BeamExtractConfig(
        **runner.config_kwargs(beam_lib.BeamExtractConfig, flag_values, skip=NOT_FLAGS),
        pipeline_args=tuple(pipeline_args),
    )


def _main_from_flags(flag_values, pipeline_args):
    logging.getLogger("apache_beam").setLevel(BEAM_LOG_LEVEL)
    return main(_config_from_flags(flag_values, pipeline_args))


def cli():
    """Console entry point."""
    from delg_tf import cli as runner

    pipeline_args = []
    runner.run_main(
        _define_flags,
        lambda flag_values: _main_from_flags(flag_values, pipeline_args),
        expected_errors=[
            runner.ErrorRule((extract.ExtractRunError,), extract.EXIT_RUN_ERROR),
            runner.ErrorRule(runner.DEFAULT_EXPECTED_ERRORS + (extract.ExtractOutputError,)),
        ],
        flags_parser=lambda argv: _parse_flags(argv, pipeline_args),
    )


if __name__ == "__main__":
    cli()
