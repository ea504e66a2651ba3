"""Extraction as an Apache Beam pipeline (the library of `python -m delg_tf.extract_beam`).

The pipeline, for the images not yet in the output:

    Create(index, name, path) -> Reshuffle -> ReadImageFn --------------> errors.tsv
                                                 | images              (dead letter)
                                                 v
            RunInference(KeyedModelHandler(DelgModelHandler)) -> shard key
                                                 |
                     GroupByKey -> WriteShardFn (HDF5 shard) -> manifest.json

* Reading: through Beam's `FileSystems` (local paths; gs://, s3://, ... where the
  matching Beam extra is installed), decoded by `delg_tf.data.images.decode_image_rgb`:
  the array and the `ImageLoadError` reasons and messages of `delg_tf.extract`'s loader.
  An unreadable image goes to the tagged output `errors`, written as `OUT/errors.tsv`
  in `delg_tf.extract`'s format (`extract.ERROR_LOG_HEADER`, `extract.error_log_line`),
  in input order; nothing is dropped silently.
* Extraction: `DelgModelHandler` loads the model once per worker process with
  `delg_tf.extract.make_extractor` (`DelgExtractor.from_saved_model`, or `from_config`
  for a DelfConfig; `tf.saved_model.load` underneath), shared between the threads of the
  process (`model_copies > 0`: that many copies per machine, shared across processes).
  A remote `--model_path` (gs://...) is first copied to a local folder (`stage_model`);
  a `--delf_config` must be a local file on every worker.
  Images of different sizes go one by one (batches of exactly one, no stacking) through
  the extractor's own host-side resize, so features equal `delg_tf.extract`'s.
  A model error on a readable image fails the pipeline (it is not a bad image).
* Output, under `OUT/` (a local folder or any `FileSystems` URL):
  `shards/<run>-<kkkkk>.h5`, each holding `images_per_shard` images in the HDF5 store
  format of `delg_tf.extraction.store` (written by `FeatureStoreWriter`), written to a
  temporary name (`*.tmp`) and renamed; `manifest.json` (`MANIFEST_FORMAT`: the store
  options and `{shard: [names]}`), rewritten (temporary name, rename) at the end of each
  run; `errors.tsv`, this run's failures. `FeatureStore(shard_files(OUT))` reads the
  shards as one store.
* Resume: a rerun reads the manifest, and the names of complete shards that a failed
  run wrote but did not list, and extracts only the other images (failed ones again).
* One run per local output: `run` holds `OUT/.delg_tf.lock` (`delg_tf.locking`) while it
  writes; another run refuses with one line naming it (a remote `OUT` has no locks).
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from delg_tf import atomic, extract
from delg_tf.configs import ConfigError, expect_int, require
from delg_tf.data.errors import ImageLoadError
from delg_tf.extraction import store as store_lib
from delg_tf.locking import output_lock

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "delg_tf.extract_beam/1"
SHARDS_SUBDIR = "shards"
SHARD_EXTENSION = ".h5"
ERROR_LOG_NAME = "errors.tsv"
ERRORS_TAG = "errors"
DEFAULT_IMAGES_PER_SHARD = 256
# `--runner` values of Beam's DirectRunner. It first tries the PrismRunner, which
# downloads a binary on first use; batch pipelines like this one then run on the
# FnApiRunner anyway, so `run` uses the FnApiRunner for them directly (honouring
# --direct_running_mode / --direct_num_workers).
DIRECT_RUNNER_NAMES = ("direct", "directrunner", "switchingdirectrunner")
GLOB_CHARACTERS = "*?["
PATH_FIELDS = ("output_dir", "images", "image_root", "delf_config", "model_path")
# Bytes copied at a time when a shard goes to a remote file system.
COPY_CHUNK_BYTES = 1 << 22


@dataclasses.dataclass(frozen=True)
class BeamExtractConfig:
    """Validated configuration of a Beam extraction.

    Each attribute but `pipeline_args` is the flag of the same name of
    `python -m delg_tf.extract_beam` (this section is their help).

    Attributes:
      output_dir: Output folder (shards, manifest.json, errors.tsv): local, or a Beam
        file system URL such as gs://bucket/features.
      images: Images: a glob (DIR/*.jpg, gs://bucket/img/*), a folder (its image files,
        not recursive) or a text file with one path per line. Names: the path after the
        glob's folder, the file name in a folder, the line of a list file.
      image_root: Base folder of relative paths in a list file (default: its folder).
      delf_config: DelfConfig .pbtxt (official DELG configs work); optional with
        --model_path.
      model_path: SavedModel directory (overrides the DelfConfig's model_path).
      float16: Store descriptors as float16.
      binarize: Also store DELG* binarised local descriptors.
      images_per_shard: Images per HDF5 shard file.
      model_copies: 0: one model per worker process, shared by its threads; N > 0: N
        copies per machine, shared by its worker processes (Beam's model_copies).
      pipeline_args: Beam pipeline options (`--runner=...`, ...), each known to Beam.
    """

    output_dir: str
    images: str
    image_root: str = None
    delf_config: str = None
    model_path: str = None
    float16: bool = False
    binarize: bool = False
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    model_copies: int = 0
    pipeline_args: tuple = ()

    def __post_init__(self):
        for field in PATH_FIELDS:  # Path objects (in-process callers) as strings
            value = getattr(self, field)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, field, os.fspath(value))
        require(self.output_dir, "output_dir", "where the shards, manifest and error log go")
        require(self.images, "images", "a glob, a folder or a list file of image paths")
        if not self.delf_config and not self.model_path:
            raise ConfigError(
                "give --delf_config (a DelfConfig .pbtxt) and/or --model_path (a "
                "SavedModel directory); received neither.",
                "model_path",
            )
        expect_int("images_per_shard", self.images_per_shard, 1)
        expect_int("model_copies", self.model_copies, 0, fix="0 loads one model per worker process")
        object.__setattr__(self, "pipeline_args", tuple(self.pipeline_args))
        unknown = unknown_pipeline_args(self.pipeline_args)
        if unknown:
            raise ConfigError(
                f"unknown flag(s) {', '.join(unknown)}: neither a delg_tf.extract_beam flag nor "
                "an Apache Beam pipeline option; fix the spelling (Beam options as "
                "--name=value) or install the Beam extra that defines them."
            )

    @property
    def manifest(self):
        return FileSystems.join(self.output_dir, MANIFEST_NAME)

    @property
    def shards_dir(self):
        return FileSystems.join(self.output_dir, SHARDS_SUBDIR)

    @property
    def error_log(self):
        return FileSystems.join(self.output_dir, ERROR_LOG_NAME)

    def pipeline_options(self):
        return PipelineOptions(list(self.pipeline_args))


def unknown_pipeline_args(args):
    """The `--name` of each of `args` that no Beam `PipelineOptions` class defines."""
    options = PipelineOptions(list(args))
    known = options.get_all_options(retain_unknown_options=False)
    every = options.get_all_options(retain_unknown_options=True)
    return sorted(f"--{name}" for name in every if name not in known)


# Files -------------------------------------------------------------------------------


def is_local(path):
    """True if `path` is on the local file system (no URL scheme Beam knows)."""
    try:
        return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)
    except ValueError:
        return False


def _check_file_system(path, flag):
    try:
        FileSystems.get_filesystem(path)
    except ValueError as e:
        raise ConfigError(
            f"{flag}={path}: no Beam file system for it ({e}); install the Beam extra of that "
            "scheme (apache-beam[gcp] for gs://, apache-beam[aws] for s3://) or pass a local "
            "path."
        ) from e


def _read_bytes(path):
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _write_bytes_atomic(path, data):
    """Writes `data` to `path` through a temporary name and a rename (locally with
    `delg_tf.atomic`: fsynced first).
    """
    if is_local(path):
        atomic.write_bytes_atomic(path, data, parents=True)
        return
    tmp = path + store_lib.TMP_SUFFIX
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def read_image(path):
    """uint8 RGB [H, W, 3] of the image file at `path` (any `FileSystems` path), read like
    `delg_tf.extract` reads a local file (alpha dropped as the official RgbLoader).

    Raises:
      ImageLoadError: missing, a folder, unreadable, or refused by `decode_image_rgb`
        (with the reasons and messages of `load_image_rgb`).
    """
    from delg_tf.data import images

    if not FileSystems.exists(path):
        raise ImageLoadError(path, "missing", images.MISSING_FILE_MESSAGE)
    try:
        data = _read_bytes(path)
    except IsADirectoryError:
        raise ImageLoadError(path, "unreadable", images.DIRECTORY_MESSAGE) from None
    except OSError as e:  # Beam's BeamIOError is an OSError too.
        raise ImageLoadError(path, "unreadable", f"cannot open file ({e})") from e
    return images.decode_image_rgb(data, path, alpha="drop")


# Inputs ------------------------------------------------------------------------------


def _glob_folder(pattern):
    """The folder part of a glob (up to the last separator before its first wildcard)."""
    first = min(pattern.index(c) for c in GLOB_CHARACTERS if c in pattern)
    return pattern[: pattern.rfind("/", 0, first) + 1]


def _match(pattern, flag="--images"):
    try:
        results = FileSystems.match([pattern])
    except OSError as e:
        raise ConfigError(f"{flag}={pattern}: cannot list it ({e}).") from e
    return sorted(m.path for m in results[0].metadata_list)


def _remote_list_file(images, image_root):
    root = image_root or FileSystems.split(images)[0]
    pairs = []
    for line in _read_bytes(images).decode("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            absolute = os.path.isabs(line) or "://" in line
            pairs.append((line, line if absolute else FileSystems.join(root, line)))
    return pairs


def list_inputs(images, image_root=None):
    """(name, path) pairs of `--images`, in a stable order.

    A glob: every file it matches, named by its path after the glob's folder. A local
    folder or list file: exactly `delg_tf.extract.list_images` (same names and paths). A
    remote folder (ending in "/") or list file: the same rules through `FileSystems`.

    Raises:
      ConfigError: nothing there, or a glob matching no file.
    """
    from delg_tf.data.images import IMAGE_EXTENSIONS

    _check_file_system(images, "--images")
    if any(c in images for c in GLOB_CHARACTERS):
        folder = _glob_folder(images)
        paths = _match(images)
        if not paths:
            raise ConfigError(
                f"--images={images} matches no file; check the pattern (e.g. "
                "DIR/*.jpg, gs://bucket/img/*).",
                "images",
            )
        return [(p[len(folder) :] if p.startswith(folder) else p, p) for p in paths]
    if is_local(images):
        return [(name, os.fspath(path)) for name, path in extract.list_images(images, image_root)]
    if images.endswith("/"):
        paths = [
            p
            for p in _match(FileSystems.join(images, "*"))
            if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS
        ]
        return [(FileSystems.split(p)[1], p) for p in paths]
    if not FileSystems.exists(images):
        raise ConfigError(
            f"--images {images} does not exist; expected a glob, a folder "
            "(ending in /) or a list file.",
            "images",
        )
    return _remote_list_file(images, image_root)


def check_unique(names):
    """Raises ConfigError naming duplicated names (as `delg_tf.extract`)."""
    if len(set(names)) != len(names):
        seen, duplicated = set(), set()
        for name in names:
            (duplicated if name in seen else seen).add(name)
        raise ConfigError(f"image names must be unique; duplicated: {sorted(duplicated)[:5]}.")


# Manifest and shards -----------------------------------------------------------------


def _shard_options(float16, binarized):
    return {"float16": bool(float16), "binarized": bool(binarized)}


def read_manifest(output_dir):
    """The manifest dict of `output_dir` (`MANIFEST_FORMAT`), or None if there is none.

    Raises:
      StoreError: a manifest of another format or not JSON.
    """
    path = FileSystems.join(os.fspath(output_dir), MANIFEST_NAME)
    if not FileSystems.exists(path):
        return None
    try:
        manifest = json.loads(_read_bytes(path).decode("utf-8"))
    except ValueError as e:
        raise store_lib.StoreError(
            f"{path}: not a JSON manifest ({e}); delete it (the shards "
            "are kept and listed again by the next run)."
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise store_lib.StoreError(
            f"{path}: not a delg_tf.extract_beam manifest (format "
            f"{MANIFEST_FORMAT}); use another --output_dir."
        )
    return manifest


def shard_files(output_dir):
    """Paths of the shards listed in `output_dir`'s manifest (for `FeatureStore`)."""
    output_dir = os.fspath(output_dir)
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise store_lib.StoreError(
            f"{FileSystems.join(output_dir, MANIFEST_NAME)} does not "
            "exist; run `python -m delg_tf.extract_beam` first."
        )
    return [FileSystems.join(output_dir, shard) for shard in sorted(manifest["shards"])]


def _shard_contents(path):
    """(names, options) of a complete shard file at any `FileSystems` path."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as stream:
        names, options = store_lib.file_names_and_options(stream, what=path)
    return names, _shard_options(options["float16"], options["binarized"])


def known_shards(config):
    """{shard path relative to `output_dir`: names} of the listed and unlisted complete
    shards of `config.output_dir`.

    Raises:
      StoreError: the output was written with other --float16 / --binarize.
    """
    manifest = read_manifest(config.output_dir) or {"shards": {}}
    wanted = _shard_options(config.float16, config.binarize)
    if manifest["shards"] and manifest.get("options") != wanted:
        raise store_lib.StoreError(
            f"{config.manifest}: written with {manifest.get('options')}; this run asks for "
            f"{wanted}. Use the same --float16 / --binarize to resume, or another --output_dir."
        )
    shards = dict(manifest["shards"])
    for path in _match(FileSystems.join(config.shards_dir, "*" + SHARD_EXTENSION)):
        relative = f"{SHARDS_SUBDIR}/{FileSystems.split(path)[1]}"
        if relative not in shards:  # written by a run that failed before its manifest
            names, options = _shard_contents(path)
            if options != wanted:
                raise store_lib.StoreError(
                    f"{path}: written with {options}; this run asks for {wanted}. Use the "
                    "same --float16 / --binarize to resume, or another --output_dir."
                )
            shards[relative] = names
    return shards


def write_manifest(new_shards, output_dir, float16, binarized):
    """Writes `output_dir`'s manifest: the shards of the one there (if any) plus
    `new_shards` ((relative path, names) pairs); atomic (temporary name and rename).
    Returns its path.
    """
    shards = dict((read_manifest(output_dir) or {"shards": {}})["shards"])
    shards.update({relative: list(names) for relative, names in new_shards})
    manifest = {
        "format": MANIFEST_FORMAT,
        "options": _shard_options(float16, binarized),
        "shards": dict(sorted(shards.items())),
    }
    path = FileSystems.join(output_dir, MANIFEST_NAME)
    _write_bytes_atomic(
        path, (json.dumps(manifest, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    )
    return path


def write_error_log(rows, path):
    """Writes the error log `path` (header, then the rows of (index, line) in index order),
    atomic (temporary name and rename).
    """
    text = extract.ERROR_LOG_HEADER + "".join(line for _, line in sorted(rows))
    _write_bytes_atomic(path, text.encode("utf-8"))


def _write_part(directory, records, float16, binarized):
    """One store file of `records` ((name, features dict)) in `directory`; its path."""
    with store_lib.FeatureStoreWriter(
        directory, float16=float16, binarized=binarized, flush_every=len(records) + 1
    ) as writer:
        for name, features in records:
            writer.add(name, features)
    (part,) = [p for p in os.listdir(directory) if store_lib.PART_PATTERN.match(p)]
    return os.path.join(directory, part)


def write_shard(path, records, float16=False, binarized=False):
    """Writes `records` ((name, features dict) pairs) as one HDF5 store file at `path`
    (any `FileSystems` path) under a temporary name, then renames it to `path`.
    """
    tmp = path + store_lib.TMP_SUFFIX
    if is_local(path):  # a temporary folder beside it: the rename stays on one disk
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        os.replace(_write_part(tmp, records, float16, binarized), path)
        shutil.rmtree(tmp)
        return
    with tempfile.TemporaryDirectory() as local:
        part = _write_part(local, records, float16, binarized)
        with (
            open(part, "rb") as source,
            FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as target,
        ):
            shutil.copyfileobj(source, target, COPY_CHUNK_BYTES)
    FileSystems.rename([tmp], [path])


def stage_model(model_path):
    """A local copy (a new temporary folder) of the SavedModel folder at `model_path`, a
    `FileSystems` URL: the model loader reads local files only.
    """
    local = tempfile.mkdtemp(prefix="delg_tf_model_")
    base = model_path.rstrip("/") + "/"
    for path in _match(base + "**", "--model_path"):
        relative = path[len(base) :]
        if not relative or relative.endswith("/"):  # folder placeholder objects
            continue
        target = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with (
            FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as source,
            open(target, "wb") as copy,
        ):
            shutil.copyfileobj(source, copy, COPY_CHUNK_BYTES)
    return local


def remove_stale_temporaries(shards_dir):
    """Deletes `*.tmp` files or folders left in `shards_dir` by a killed run."""
    for path in _match(FileSystems.join(shards_dir, "*" + store_lib.TMP_SUFFIX)):
        if is_local(path) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            FileSystems.delete([path])


# Pipeline steps ----------------------------------------------------------------------


class ReadImageFn(beam.DoFn):
    """(index, name, path) -> ((index, name), image), or to `ERRORS_TAG` the
    (index, errors.tsv line) of an image that cannot be read.
    """

    def process(self, item):
        index, name, path = item
        try:
            image = read_image(path)
        except ImageLoadError as e:
            yield pvalue.TaggedOutput(ERRORS_TAG, (index, extract.error_log_line(name, e)))
            return
        yield (index, name), image


def features_record(features):
    """The store fields of `DelgFeatures` as a dict of numpy arrays."""
    return {
        "image_shape": tuple(int(v) for v in features.image_shape),
        "global_descriptor": np.asarray(features.global_descriptor),
        "locations": np.asarray(features.locations),
        "descriptors": np.asarray(features.descriptors),
        "attention": np.asarray(features.attention),
        "scales": np.asarray(features.scales),
    }


class DelgModelHandler(ModelHandler):
    """Beam `ModelHandler` of a DELG model: image uint8 [H, W, 3] -> features record.

    The model is `delg_tf.extract.make_extractor(config)` (the `DelgExtractor` of
    `config.delf_config` / `config.model_path`), loaded once per worker process and
    shared by its threads, or, with `config.model_copies > 0`, that many copies per
    machine shared across processes. Batches hold one image (images differ in size and
    the extractor resizes each on the host like the official one): `run_inference`
    gets a one-element batch and returns the record of `features_record`.

    Args:
      config: `BeamExtractConfig` (its model fields are used).
    """

    def __init__(self, config):
        super().__init__(
            min_batch_size=1, max_batch_size=1, model_copies=config.model_copies or None
        )
        self._config = config

    def load_model(self):
        config = self._config
        if not config.model_path or is_local(config.model_path):
            return extract.make_extractor(config)
        local = stage_model(config.model_path)
        try:  # the variables and the config asset are read while loading
            return extract.make_extractor(dataclasses.replace(config, model_path=local))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def run_inference(self, batch, model, inference_args=None):
        return [PredictionResult(image.shape, features_record(model(image))) for image in batch]

    def get_num_bytes(self, batch):
        return sum(np.asarray(image).nbytes for image in batch)

    def get_metrics_namespace(self):
        return "DelgExtraction"


def _keyed_by_shard(element, images_per_shard):
    (index, name), result = element
    return index // images_per_shard, (index, name, result.inference)


class WriteShardFn(beam.DoFn):
    """(shard key, [(index, name, record)]) -> (shard path relative to the output, names);
    writes the shard `shards/<run_id>-<key>.h5` (same content if a bundle is retried).
    """

    def __init__(self, config, run_id):
        self._config = config
        self._run_id = run_id

    def process(self, element):
        key, values = element
        values = sorted(values, key=lambda value: value[0])
        names = [name for _, name, _ in values]
        relative = f"{SHARDS_SUBDIR}/{self._run_id}-{key:05d}{SHARD_EXTENSION}"
        write_shard(
            FileSystems.join(self._config.output_dir, relative),
            [(name, record) for _, name, record in values],
            self._config.float16,
            self._config.binarize,
        )
        yield relative, names


def write_inputs(path, todo):
    """Writes the (index, name, path) triples `todo` as JSON lines (the pipeline's input:
    a file, not a `Create` of millions of values inside the job graph).
    """
    lines = "".join(json.dumps(list(item), ensure_ascii=False) + "\n" for item in todo)
    _write_bytes_atomic(path, lines.encode("utf-8"))


def _parse_input(line):
    index, name, path = json.loads(line)
    return int(index), name, path


def build_pipeline(pipeline, config, inputs, run_id):
    """Adds the extraction of the images listed in `inputs` (`write_inputs`) to `pipeline`;
    shards are named after `run_id`.
    """
    read = (
        pipeline
        | "Images" >> beam.io.ReadFromText(inputs, coder=beam.coders.StrUtf8Coder())
        | "Parse" >> beam.Map(_parse_input)
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadImageFn()).with_outputs(ERRORS_TAG, main="images")
    )
    shards = (
        read.images
        | "Extract" >> RunInference(KeyedModelHandler(DelgModelHandler(config)))
        | "ShardKey" >> beam.Map(_keyed_by_shard, config.images_per_shard)
        | "GroupShards" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShardFn(config, run_id))
    )
    _ = (
        shards
        | "CollectShards" >> beam.combiners.ToList()
        | "WriteManifest"
        >> beam.Map(write_manifest, config.output_dir, config.float16, config.binarize)
    )
    _ = (
        read[ERRORS_TAG]
        | "CollectErrors" >> beam.combiners.ToList()
        | "WriteErrors" >> beam.Map(write_error_log, config.error_log)
    )
    return pipeline


def make_runner(options):
    """The runner object for `options`: the FnApiRunner for the DirectRunner (see
    `DIRECT_RUNNER_NAMES`), else None (Beam makes the `--runner` it names).
    """
    runner = options.view_as(StandardOptions).runner
    if runner is None or runner.lower() in DIRECT_RUNNER_NAMES:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def _check_model(config):
    """One clear error before any worker starts if the model files are not there (or a
    --delf_config is not local: it, and the files it names, are read with local file
    APIs on the workers).
    """
    if config.delf_config and not is_local(config.delf_config):
        raise ConfigError(
            f"--delf_config={config.delf_config}: must be a local file (on the "
            "workers too, e.g. in their container); a remote SavedModel can be "
            "given with --model_path.",
            "delf_config",
        )
    for flag, path, needed in (
        ("--model_path", config.model_path, "saved_model.pb"),
        ("--delf_config", config.delf_config, None),
    ):
        if not path:
            continue
        _check_file_system(path, flag)
        if not FileSystems.exists(FileSystems.join(path, needed) if needed else path):
            what = "a SavedModel directory (with saved_model.pb)" if needed else "a .pbtxt file"
            raise FileNotFoundError(
                f"{flag}={path} does not exist or is not {what}; pass "
                "the path of the model to extract with."
            )


def run(config):
    """Extracts the images of `config` not yet in its output with a Beam pipeline.

    Args:
      config: `BeamExtractConfig` (its `pipeline_args` choose the runner).

    Returns:
      Path (str) of the manifest.

    Raises:
      ConfigError: bad --images / duplicated names.
      StoreError: the output was written with other store options.
      NoImageExtractedError: every image still to do failed (listed in errors.tsv).
      LockedError: another run is writing `output_dir` (a local one).
    """
    started = time.time()
    _check_file_system(config.output_dir, "--output_dir")
    items = list_inputs(config.images, config.image_root)
    if not items:
        raise ConfigError(
            f"--images={config.images} holds no image file; check the folder, list or pattern.",
            "images",
        )
    check_unique([name for name, _ in items])
    _, todo, skipped = _pending(config, items)
    if not todo:
        print(
            f"extract_beam: {len(items)} images, 0 extracted, {skipped} already done, 0 "
            f"failed; manifest: {config.manifest}"
        )
        return config.manifest
    _check_model(config)
    if not FileSystems.exists(config.output_dir):
        FileSystems.mkdirs(config.output_dir)
    # One run per output (delg_tf.locking; remote file systems have no locks): another run
    # would delete this one's temporary shards and extract the same images again.
    with output_lock(config.output_dir, f"--output_dir={config.output_dir}"):
        return _run_locked(config, items, started)


def _pending(config, items):
    """(complete shards of the output, (index, name, path) of the images still to do,
    how many are done).
    """
    previous = known_shards(config)
    done = {name for names in previous.values() for name in names}
    todo = [
        (index, name, path)
        for index, (name, path) in enumerate(item for item in items if item[0] not in done)
    ]
    return previous, todo, len(items) - len(todo)


def _run_locked(config, items, started):
    """`run` once the output is locked: the images still to do are listed again (a run
    that ended meanwhile may have done some; if it did all, the pipeline runs empty).
    """
    previous, todo, skipped = _pending(config, items)
    remove_stale_temporaries(config.shards_dir)
    if previous != (read_manifest(config.output_dir) or {"shards": {}})["shards"]:
        write_manifest(previous.items(), config.output_dir, config.float16, config.binarize)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    inputs = FileSystems.join(config.output_dir, f"inputs-{run_id}.jsonl")
    write_inputs(inputs, todo)
    options = config.pipeline_options()
    try:
        with beam.Pipeline(runner=make_runner(options), options=options) as pipeline:
            build_pipeline(pipeline, config, inputs, run_id)
    finally:
        FileSystems.delete([inputs])
    shards = (read_manifest(config.output_dir) or {"shards": {}})["shards"]
    extracted = sum(
        len(names)
        for shard, names in shards.items()
        if shard.startswith(f"{SHARDS_SUBDIR}/{run_id}-")
    )
    failures = len(_read_bytes(config.error_log).decode("utf-8").splitlines()) - 1
    if extracted + skipped == 0:
        raise extract.NoImageExtractedError(
            f"all {failures} of {len(todo)} images failed, none extracted (no shard written); "
            f"the reason of each is in {config.error_log}: check --images / --image_root and "
            "the image files."
        )
    print(
        f"extract_beam: {len(items)} images, {extracted} extracted, {skipped} already done, "
        f"{failures} failed (see {config.error_log}) in {time.time() - started:.1f} s; "
        f"manifest: {config.manifest}"
    )
    return config.manifest
