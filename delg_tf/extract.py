"""Batch DELG extraction into an HDF5 feature store: `python -m delg_tf.extract`.

    python -m delg_tf.extract --images=DIR_OR_LIST.txt --output_dir=OUT \
        [--delf_config=r50delg_gld_config.pbtxt] [--model_path=SAVED_MODEL] \
        [--shard_index=0 --num_shards=1] [--float16] [--binarize] [--write_delf]

* `--images`: a folder (image files, not recursive) or a text file with one
  path per line (relative paths resolved against `--image_root`, default the
  list file's folder). Image names in the store are these relative paths.
* model: `--delf_config` (official DelfConfig text; its `model_path`, or
  `--model_path` if given) and/or `--model_path` alone (a delg_tf export uses its
  baked-in config; other SavedModels the official R50 DELG defaults).
* output: `OUT/features.h5` (or `features-SSSSS-of-NNNNN.h5` per shard), built from
  crash-safe parts in `OUT/features[...].parts/`; re-running resumes (finished
  images skipped). With `--write_delf`, official per-image
  `OUT/delf/<path>.delf` and `<path>.delg_global` files too, `<path>` being the
  image name mapped inside `OUT/delf/` (`delf_io.relative_output_path`: root and
  drive dropped, `..` resolved without leaving the folder, unicode kept); two
  names mapping to the same file are refused before anything runs.
* failures: image files that cannot be read or decoded are listed in
  `OUT/errors[...].tsv` (name, reason, message) and skipped; the run succeeds
  (exit 0) if at least one image of the shard is in the store. If every image
  fails, or the model itself fails on a readable image (a TensorFlow/graph
  error is not a bad image), the run stops with one `error:` line and exit code
  `EXIT_RUN_ERROR` (3); the images extracted until then are kept and a rerun
  resumes. Bad flags exit with 2.
* bfloat16: a `--compute_dtype=bfloat16` export on a CPU without native bfloat16
  (no AVX512_BF16 / AMX-BF16, or oneDNN capped below them) logs one warning: it is
  likely slower than float32 there (`delg_tf.extraction.folded`).

The library function is `main(config, paths=None, extractor=None) -> Path` (the store
path); `paths` items may carry their own image source and `resize_factor` (e.g. the
evaluation's query crops, passed as arrays, never written to disk).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from delg_tf import atomic, interrupts
from delg_tf.configs import ConfigError, expect, expect_int, is_int, require
from delg_tf.locking import output_lock
from delg_tf.progress import progress_bar

ERROR_LOG_HEADER = "name\treason\tmessage\n"
# Exit code of a run that gives no usable store (every image failed, the model failed);
# 2 (`delg_tf.cli.EXIT_USAGE_ERROR`) stays for bad flags / configs / output folders.
EXIT_RUN_ERROR = 3
DELF_SUBDIR = "delf"


class ExtractOutputError(OSError):
    """`--output_dir` cannot be created or written (permissions, a file in the way, disk full)."""


class ExtractRunError(ValueError):
    """The run gives no usable store: every image failed, or the model failed.

    A ValueError, so that in-process callers reporting ValueErrors as one line
    (`delg_tf.evaluate`, `delg_tf.demo`) report it that way too; `python -m
    delg_tf.extract` exits with `EXIT_RUN_ERROR`.
    """


class ExtractModelError(ExtractRunError):
    """The model raised on an image that was read fine (not a bad image)."""


class NoImageExtractedError(ExtractRunError):
    """Every image of the shard failed (all listed in the error log)."""


def _is_within(path, folder):
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) in (path, folder)


def output_dir_error(error, output_dir):
    """`ExtractOutputError` naming `output_dir` and the fix if `error` (an OSError) is a
    failure to create or write it, else None.
    """
    if error.errno not in atomic.OUTPUT_FOLDER_ERRNOS:
        return None
    if error.filename is not None and not _is_within(error.filename, output_dir):
        return None
    reason = os.strerror(error.errno)
    return ExtractOutputError(
        f"cannot write to --output_dir {output_dir} ({reason}); pass a folder you can write to "
        "(not under a file) on a disk with free space, then rerun (finished images are kept)."
    )


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Validated configuration of a batch extraction.

    Each attribute is the flag of the same name of `python -m delg_tf.extract` (this
    section is their help).

    Attributes:
      output_dir: Output folder (store, parts, error log, .delf files).
      images: Folder of images or a text file with one path per line.
      image_root: Base folder of relative paths in a list file.
      delf_config: DelfConfig .pbtxt (official DELG configs work); optional with
        --model_path.
      model_path: SavedModel directory (overrides the DelfConfig's model_path).
      shard_index: This machine's shard: it extracts images[shard_index::num_shards].
      num_shards: Number of shards.
      float16: Store descriptors as float16.
      binarize: Also store DELG* binarised local descriptors.
      write_delf: Also write official .delf / .delg_global files under
        --output_dir/delf/ (image names mapped inside it).
      flush_every: Images per crash-safe part file.
      progress: Show a progress bar.
    """

    output_dir: str
    images: str = None
    image_root: str = None
    delf_config: str = None
    model_path: str = None
    shard_index: int = 0
    num_shards: int = 1
    float16: bool = False
    binarize: bool = False
    write_delf: bool = False
    flush_every: int = 64
    progress: bool = True

    def __post_init__(self):
        require(self.output_dir, "output_dir", "where the feature store goes")
        if not self.delf_config and not self.model_path:
            raise ConfigError(
                "give --delf_config (a DelfConfig .pbtxt) and/or --model_path (a "
                "SavedModel directory); received neither.",
                "model_path",
            )
        expect_int("num_shards", self.num_shards, 1)
        expect(
            is_int(self.shard_index) and 0 <= self.shard_index < self.num_shards,
            "shard_index",
            f"in [0, --num_shards={self.num_shards})",
            self.shard_index,
        )
        expect_int("flush_every", self.flush_every, 1)

    @property
    def suffix(self):
        if self.num_shards == 1:
            return ""
        return f"-{self.shard_index:05d}-of-{self.num_shards:05d}"

    @property
    def store_path(self):
        return Path(self.output_dir) / f"features{self.suffix}.h5"

    @property
    def parts_dir(self):
        return Path(self.output_dir) / f"features{self.suffix}.parts"

    @property
    def error_log(self):
        return Path(self.output_dir) / f"errors{self.suffix}.tsv"

    @property
    def lock_name(self):
        """The shard's lock file in --output_dir (`delg_tf.locking`), held while it writes."""
        return f".features{self.suffix}.lock"


def list_images(images, image_root=None):
    """(name, path) pairs from a folder or a list file, in a stable order."""
    from delg_tf.data.images import list_image_files

    source = Path(images)
    if source.is_dir():
        return [(p.name, p) for p in list_image_files(source)]
    if source.is_file():
        root = Path(image_root) if image_root else source.parent
        pairs = []
        for line in source.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line)
                pairs.append((line, path if path.is_absolute() else root / path))
        return pairs
    raise ConfigError(
        f"--images {images} does not exist; expected a folder of images or a "
        "text file with one image path per line.",
        "images",
    )


def image_item(item):
    """(name, source, resize_factor) of one entry of `main`'s `paths`.

    An entry is an image path (named by its file name), a (name, source) pair or a
    (name, source, resize_factor) triple. The source is an image file path, a uint8
    RGB array [H, W, 3], or a callable returning one (loaded when the image is
    extracted; it may raise `ImageLoadError`, logged like an unreadable file). The
    resize factor (official `extract_features.py`: a query crop is resized as its
    whole image would be) is passed to the extractor; None: not passed (its default).

    Raises:
      ConfigError: not one of these forms, or a negative resize factor.
    """
    import numbers

    if not isinstance(item, tuple):
        return Path(item).name, Path(item), None
    if len(item) not in (2, 3):
        raise ConfigError(
            f"image item {item!r}: expected (name, source) or (name, source, "
            f"resize_factor), received {len(item)} values."
        )
    name, source = item[:2]
    factor = item[2] if len(item) == 3 else None
    if factor is not None and (not isinstance(factor, numbers.Real) or factor < 0):
        raise ConfigError(
            f"image {name!r}: resize_factor must be a number >= 0 or None (the "
            f"extractor's default), received {factor!r}."
        )
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
    return name, source, factor


def load_image_source(source):
    """uint8 RGB array [H, W, 3] of an item's source (see `image_item`): a file decoded
    like the official RgbLoader (alpha dropped), an array as is, a callable's result.
    """
    import numpy as np

    from delg_tf.data.images import load_image_rgb

    if callable(source):
        source = source()
    if isinstance(source, (str, os.PathLike)):
        return load_image_rgb(source, alpha="drop")
    return np.asarray(source)


def error_log_line(name, error):
    """The error log row of image `name` refused with `error` (an `ImageLoadError`):
    `name<TAB>reason<TAB>message`, newlines in it turned into spaces, ending in one.
    """
    return f"{name}\t{error.reason}\t{error}\n".replace("\n", " ").rstrip() + "\n"


def describe_source(source):
    """Short text naming an item's source in messages (its path, or what it is)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    shape = getattr(source, "shape", None)
    return f"an in-memory image of shape {tuple(shape)}" if shape is not None else str(source)


def make_extractor(config):
    """`DelgExtractor` for a config (DelfConfig file and/or SavedModel path)."""
    from delg_tf.extraction.extractor import DelgExtractor

    if config.delf_config:
        extractor = DelgExtractor.from_config(config.delf_config, model_path=config.model_path)
    else:
        extractor = DelgExtractor.from_saved_model(config.model_path)
    _check_bfloat16_export(extractor.config.model_path or config.model_path)
    return extractor


def official_file_bases(names):
    """{name: path relative to `OUT/delf/`} of the `--write_delf` files of `names`.

    See `delf_io.official_file_bases` (the mapping, and names whose files would clash,
    which are refused with ConfigError).
    """
    from delg_tf.extraction import delf_io

    try:
        return delf_io.official_file_bases(names, folder=f"--output_dir/{DELF_SUBDIR}")
    except ValueError as e:
        raise ConfigError(f"--write_delf: {e}") from e


def _model_description(config):
    if config.model_path:
        return f"--model_path={config.model_path}"
    return f"--delf_config={config.delf_config}"


def error_summary(error):
    """One line of an error: its message's last paragraph (a TF graph execution error
    puts the op's message after the Python stack of the node), first line, without the
    `[[{{node ...}}]]` / `[Op:...]` tails, plus the node name if TF gives one.
    """
    text = str(getattr(error, "message", None) or error)
    blocks = [block for block in re.split(r"\n\s*\n", text) if block.strip()]
    lines = [line.strip() for line in (blocks[-1] if blocks else "").splitlines()]
    line = next((line for line in lines if line), "")
    line = re.sub(r"\s*(\[\[\{\{node .*|\[Op:[^\]]*\])\s*$", "", line) or type(error).__name__
    node = re.search(r"Detected at node '?([^'\s]+)'? defined at", text)
    return f"{line} (node {node.group(1)})" if node else line


def model_error(error, name, path, config, kept):
    """`ExtractModelError` for `error` raised by the model on image `name` (at `path`)."""
    return ExtractModelError(
        f"the model ({_model_description(config)}) failed on image {name!r} ({path}): "
        f"{type(error).__name__}: {error_summary(error)}; this is a model/runtime error, not "
        f"a bad image (unreadable images go to {config.error_log}): check the model and its "
        f"config, then rerun (the {kept} image(s) extracted so far are kept)."
    )


def saved_model_computes_in_bfloat16(path):
    """True if the SavedModel at `path` has bfloat16 convolutions (an export made with
    `--compute_dtype=bfloat16`); False if not, or if its graph cannot be read.
    """
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    except (OSError, DecodeError):
        return False
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        nodes = [n for f in graph.library.function for n in f.node_def] + list(graph.node)
        if any(n.op == "Conv2D" and n.attr["T"].type == types_pb2.DT_BFLOAT16 for n in nodes):
            return True
    return False


def _check_bfloat16_export(model_path):
    """For a bfloat16 export: refuses (BFloat16UnavailableError, one line) where bfloat16
    convolutions cannot run, and logs one warning where this CPU emulates bfloat16 (the
    graph is only read on such CPUs).
    """
    from delg_tf.extraction import folded

    if not model_path:
        return
    emulated = folded.emulated_bfloat16_reason() is not None
    if (
        emulated or folded.bfloat16_convolution_error() is not None
    ) and saved_model_computes_in_bfloat16(model_path):
        folded.check_bfloat16_runs(what=f"--model_path={model_path} (a bfloat16 export)")
        folded.warn_if_bfloat16_emulated(folded.BFLOAT16, what=f"--model_path={model_path}")


def _write_official_files(output_dir, relative_base, features):
    from delg_tf.extraction import delf_io

    base = Path(output_dir) / DELF_SUBDIR / relative_base
    if features.attention.size or features.descriptors.size:
        delf_io.write_delf(
            base.with_name(base.name + delf_io.DELF_EXTENSION),
            features.locations,
            features.scales,
            features.descriptors,
            features.attention,
        )
    if features.global_descriptor.size:
        delf_io.write_datum(
            base.with_name(base.name + delf_io.DELG_GLOBAL_EXTENSION), features.global_descriptor
        )


def main(config: ExtractConfig, paths=None, extractor=None) -> Path:
    """Extracts features of images into the HDF5 store of `config`.

    Args:
      config: `ExtractConfig`.
      paths: optional list of images, each an image path, a (name, source) pair or a
        (name, source, resize_factor) triple (see `image_item`); default: the
        (name, path) pairs of `config.images`.
      extractor: optional ready `DelgExtractor` (default: `make_extractor(config)`),
        called as `extractor(image)`, or `extractor(image, resize_factor=f)` for the
        images given a resize factor.

    Returns:
      Path of the consolidated store file.

    Raises:
      ConfigError: duplicated names, bad items, or (`write_delf`) names whose
        files clash.
      ExtractModelError: the extractor raised on a readable image (stops the run).
      NoImageExtractedError: every image of the shard failed to load.
      LockedError: another process is writing this shard of `output_dir`.
    """
    from delg_tf.extraction.store import completed_names

    if paths is None:
        if not config.images:
            raise ConfigError("no images: pass --images (folder or list file).")
        paths = list_images(config.images, config.image_root)
    items = [image_item(p) for p in paths]
    names = [n for n, _, _ in items]
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ConfigError(f"image names must be unique; duplicated: {duplicated}.")
    # All shards write into the same delf/ folder: names are checked over all of them.
    bases = official_file_bases(names) if config.write_delf else {}
    shard = items[config.shard_index :: config.num_shards]
    # The model is loaded before any output folder exists: a missing or broken
    # SavedModel / DelfConfig leaves nothing behind.
    done = completed_names(config.parts_dir)
    if extractor is None and any(n not in done for n, _, _ in shard):
        extractor = make_extractor(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # One writer per shard (other shards may run in the same folder); see delg_tf.locking.
    with output_lock(
        output_dir,
        f"--output_dir={output_dir} (shard {config.shard_index}/{config.num_shards})",
        name=config.lock_name,
    ):
        return _extract_shard(config, shard, extractor, bases, output_dir)


def _extract_shard(config, shard, extractor, bases, output_dir) -> Path:
    """`main` once the shard's lock is held: extracts the images of `shard` not yet in
    its parts, then consolidates the store.
    """
    from delg_tf.data.errors import ImageLoadError
    from delg_tf.extraction.store import FeatureStoreWriter, consolidate

    writer = FeatureStoreWriter(
        config.parts_dir,
        float16=config.float16,
        binarized=config.binarize,
        flush_every=config.flush_every,
    )
    todo = [item for item in shard if item[0] not in writer.done]
    if extractor is None and todo:  # the images of a corrupted part set aside by the writer
        extractor = make_extractor(config)
    skipped = len(shard) - len(todo)
    failures = 0
    started = time.time()
    iterator = progress_bar(todo, "extract", "img", enabled=config.progress)
    # SIGTERM / SIGINT: the image in progress is finished, the queued ones are flushed to a
    # complete part (the writer's exit), then `Terminated` / `Interrupted` is raised.
    with (
        interrupts.stop_requests() as stop,
        open(config.error_log, "a", encoding="utf-8") as log,
        writer,
    ):
        if log.tell() == 0:
            log.write(ERROR_LOG_HEADER)
        for name, source, resize_factor in iterator:
            if stop.requested:
                break
            try:
                image = load_image_source(source)
            except ImageLoadError as e:  # a bad image file: logged, skipped.
                failures += 1
                log.write(error_log_line(name, e))
                log.flush()
                continue
            try:
                if resize_factor is None:
                    features = extractor(image)
                else:
                    features = extractor(image, resize_factor=resize_factor)
            except Exception as e:  # noqa: BLE001 - the image is fine: the model failed.
                # Queued images are flushed to a part when the `with` exits.
                raise model_error(e, name, describe_source(source), config, len(writer.done)) from e
            writer.add(name, features)
            if config.write_delf:
                _write_official_files(output_dir, bases[name], features)
    if stop.requested:
        raise stop.error(
            f"extraction stopped by {stop.name}: the {len(writer.done)} image(s) extracted "
            f"so far are in complete parts in {config.parts_dir} (the store is resumable); "
            "rerun the same command to extract the others and write the store."
        )
    extracted = len(todo) - failures
    if shard and extracted + skipped == 0:
        suffix = f" of shard {config.shard_index}/{config.num_shards}" if config.suffix else ""
        raise NoImageExtractedError(
            f"all {failures} of {len(shard)} images{suffix} failed, none extracted (no store "
            f"written); the reason of each is in {config.error_log}: check --images / "
            "--image_root and the image files."
        )
    store = consolidate(config.parts_dir, config.store_path, order=[n for n, _, _ in shard])
    print(
        f"extract: shard {config.shard_index}/{config.num_shards}: {len(shard)} images, "
        f"{extracted} extracted, {skipped} already done, {failures} failed "
        f"(see {config.error_log}) in {time.time() - started:.1f} s; store: {store}"
    )
    return store


def _define_flags():
    from delg_tf import cli as runner

    return runner.define_config_flags(ExtractConfig)


def _config_from_flags(flag_values):
    from delg_tf import cli as runner

    require(flag_values.images, "images", "folder or list file")
    return ExtractConfig(**runner.config_kwargs(ExtractConfig, flag_values))


def _main_from_flags(flag_values):
    config = _config_from_flags(flag_values)
    try:
        return main(config)
    except OSError as e:
        output_error = output_dir_error(e, config.output_dir)
        if output_error is None:
            raise
        raise output_error from e


def cli():
    """Console entry point."""
    from delg_tf import cli as runner

    runner.run_main(
        _define_flags,
        _main_from_flags,
        expected_errors=[
            runner.ErrorRule((ExtractRunError,), EXIT_RUN_ERROR),
            runner.ErrorRule(runner.DEFAULT_EXPECTED_ERRORS + (ExtractOutputError,)),
        ],
    )


if __name__ == "__main__":
    cli()
