"""HDF5 feature store: global descriptors and local features of many images.

Layout of one HDF5 file (a "part" or the consolidated store), M images and T
local features in total, rows of image k in [local_offsets[k], local_offsets[k+1]):

    names               str[M]        image names (relative paths)
    image_shapes        int32[M, 3]
    global_descriptors  f32|f16[M, D] (absent if no global features)
    local_offsets       int64[M + 1]
    locations           f32[T, 2]     (y, x) in original-image pixels (official order)
    descriptors         f32|f16[T, d] L2-normalised local descriptors
    descriptors_binary  uint8[T, d/8] DELG* packed signs (optional, `binarize.py`)
    scores              f32[T]        attention
    scales              f32[T]        1 / pyramid scale
    attrs: format_version, float16, binarized, local_dim, global_dim

Crash safety and resume: a `FeatureStoreWriter` writes to a directory; every
`flush_every` images it writes one part file to a temporary name, fsyncs it and
renames it to `part-NNNNNN.h5` (atomic on POSIX). A kill at any moment leaves
only complete parts plus, possibly, a `*.tmp` file that readers ignore and the
next writer deletes. Finished images are the names in complete parts; a resumed
run skips them. `consolidate()` merges the parts into one file (again via a
temporary file and a rename), ordering images by name (or a given order) so that
an interrupted-and-resumed run gives the same content as an uninterrupted one.

Checksums: every file is written in the HDF5 1.10 format (its metadata -- superblock,
object headers, chunk indexes -- carries checksums) and every numeric dataset is chunked
(`CHUNK_BYTES`) with HDF5's fletcher32 filter, which HDF5 verifies on every read of a
chunk; variable-length strings take no filter, so the names' SHA-256 is in the
`names_sha256` attribute (`checksums = "fletcher32"` marks such a file). A read of a
corrupted or truncated file raises `StoreCorruptedError`, one line naming the file, what
fails, the images concerned (the rows of the bad chunks; every image of the file when
its names cannot be read) and the fix; never different values. Files written before
(no `checksums` attribute) still read, with one warning: they cannot be verified. A
resumed writer verifies every part and moves a corrupted one aside (`*.corrupt`, a
warning naming it), so its images are extracted again.

Reading: `FeatureStore` is the one reader of this layout. It opens a store file, a
parts directory, or the shard files of `extract --num_shards` (a list or a glob) as
one logical store, lazily: names and offsets at open, global descriptors by rows,
local features of one image on demand, as plain numpy arrays. `StoreSelection`
(`open_selection`) maps dataset image names (revisitop lists, no extension) to store
rows for evaluation, re-ranking and the demo.
"""

import collections
import glob
import hashlib
import json
import logging
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from delg_tf import atomic
from delg_tf.extraction import binarize

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PART_PATTERN = re.compile(r"^part-(\d{6})\.h5$")
TMP_SUFFIX = atomic.TMP_SUFFIX  # temporary files of `delg_tf.atomic` end so.
DEFAULT_FLUSH_EVERY = 64
LOCAL_DATASETS = ("locations", "descriptors", "descriptors_binary", "scores", "scales")
REQUIRED_DATASETS = ("names", "image_shapes", "local_offsets")
BINARY_DESCRIPTORS = "descriptors_binary"
# `python -m delg_tf.extract --num_shards=N` writes `features-SSSSS-of-NNNNN.h5`.
SHARD_PATTERN = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.h5$")
GLOB_CHARACTERS = "*?["
# Dataset names (revisitop lists have no extension) are looked up with these suffixes,
# also under this prefix (stores extracted from the dataset folder's `jpg/`).
IMAGE_NAME_SUFFIXES = ("", ".jpg", ".JPG", ".jpeg", ".png")
IMAGE_PREFIX = "jpg/"
MAX_OPEN_FILES = 64  # a parts directory of a +1M-image run has ~16k files.
READ_BLOCK_ROWS = 4096  # global descriptor rows per HDF5 read.
STRING_DTYPE = h5py.string_dtype(encoding="utf-8")
# Integrity (see the module doc): the `checksums` attribute of a verified file, the
# attribute holding the SHA-256 of its names, the file format (1.10: checksummed
# metadata) and the target size of a chunk (fletcher32 is verified per chunk; a bad
# chunk names the images of its rows).
CHECKSUMS_ATTR = "checksums"
CHECKSUMS = "fletcher32"
NAMES_DIGEST_ATTR = "names_sha256"
HDF5_LIBVER = ("v110", "latest")
CHUNK_BYTES = 128 * 1024
# What h5py raises when HDF5 fails to read a file (checksum, truncation, bad object).
HDF5_READ_ERRORS = (OSError, KeyError, RuntimeError)
# A corrupted part moved aside by a resumed writer (ignored by readers).
CORRUPT_SUFFIX = ".corrupt"
NAMES_IN_MESSAGES = 5
_warned_unverified = set()


class StoreError(ValueError):
    """A feature store is missing, inconsistent or of another format."""


class StoreCorruptedError(StoreError):
    """A store file fails its checksums or cannot be read (truncated, overwritten): one
    line naming the file, what fails, the images concerned and the fix.

    Attributes:
      path: the file.
      what: what fails (part of the message).
      names: the images whose features cannot be trusted (None: unknown, the whole file).
    """

    def __init__(self, message, path=None, names=None, what=""):
        super().__init__(message)
        self.path = path
        self.names = names
        self.what = what


def _hdf5_reason(error):
    """HDF5's one-line reason of a failed read (without h5py's "synchronously")."""
    text = " ".join(str(error).split()).strip("'\"")
    return text.replace("synchronously ", "") or type(error).__name__


def _is_io_error(error):
    """True for an OS error (missing file, permissions), not a bad file."""
    return isinstance(error, OSError) and getattr(error, "errno", None) is not None


def _listed(names):
    shown = ", ".join(repr(n) for n in names[:NAMES_IN_MESSAGES])
    more = len(names) - NAMES_IN_MESSAGES
    return shown + (f" (+{more} more)" if more > 0 else "")


def corruption_error(path, what, names=None):
    """`StoreCorruptedError` of file `path`: `what` fails; `names` the images concerned
    (None: every image of the file, whose names cannot be read).
    """
    path = Path(path)
    if names is None:
        which = "its image names cannot be read, so every image of this file is affected"
    else:
        which = f"the features of {len(names)} image(s) cannot be trusted: {_listed(names)}"
    kind = "part" if PART_PATTERN.match(path.name) else "file"
    return StoreCorruptedError(
        f"feature store {kind} {path} is corrupted ({what}); {which}; fix: delete it and rerun "
        "the extraction command that wrote it with the same flags (`python -m "
        "delg_tf.extract` moves a corrupted part aside, extracts its images again and "
        "rebuilds the store from its parts), or re-extract "
        f"{'these images' if names is not None else 'every image of the file'}.",
        path,
        names,
        what,
    )


def _names_digest(names):
    return hashlib.sha256(json.dumps(list(names), ensure_ascii=False).encode()).hexdigest()


def _is_verified(handle):
    return handle.attrs.get(CHECKSUMS_ATTR) == CHECKSUMS


def _warn_unverified(paths, description):
    """One warning (per store, per process) for files written without checksums."""
    paths = [p for p in paths if str(p) not in _warned_unverified]
    if not paths:
        return
    _warned_unverified.update(str(p) for p in paths)
    logger.warning(
        "%s: %d file(s) (e.g. %s) were written without checksums (by an older "
        "delg_tf): no verification possible, a corrupted byte in them would go "
        "unnoticed; re-extract (or rerun `python -m delg_tf.extract` on the parts "
        "to rebuild the store) to add them.",
        description,
        len(paths),
        paths[0],
    )


def _records_to_arrays(records, float16, binarized, local_dim=0, global_dim=0):
    """Concatenates a list of record dicts into the store layout (numpy).

    Images without a global descriptor (e.g. too small to extract) get a zero row
    when the store has global descriptors; images without local features get no rows.
    """
    float_type = np.float16 if float16 else np.float32
    counts = [len(r["scores"]) for r in records]
    arrays = {
        "names": np.array([r["name"] for r in records], dtype=object),
        "image_shapes": np.array([r["image_shape"] for r in records], np.int32).reshape(-1, 3),
        "local_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    }
    if global_dim:
        rows = np.zeros([len(records), global_dim], np.float32)
        for k, r in enumerate(records):
            value = np.asarray(r["global_descriptor"], np.float32).reshape(-1)
            if value.size not in (0, global_dim):
                raise StoreError(
                    f"image {r['name']!r}: global descriptor of size {value.size}, "
                    f"expected {global_dim} like the rest of the store."
                )
            if value.size:
                rows[k] = value
        arrays["global_descriptors"] = rows.astype(float_type)

    def cat(key, shape_tail, dtype):
        parts = [
            np.asarray(r[key], dtype).reshape((-1,) + shape_tail)
            for r, n in zip(records, counts)
            if n
        ]
        return np.concatenate(parts) if parts else np.zeros((0,) + shape_tail, dtype)

    arrays["locations"] = cat("locations", (2,), np.float32)
    arrays["scores"] = cat("scores", (), np.float32)
    arrays["scales"] = cat("scales", (), np.float32)
    descriptors = cat("descriptors", (local_dim,), np.float32)
    arrays["descriptors"] = descriptors.astype(float_type)
    if binarized:
        arrays["descriptors_binary"] = binarize.pack_binary(descriptors)
    return arrays


def chunk_shape(shape, dtype):
    """Chunks of whole rows of about `CHUNK_BYTES` (at least one row; no dimension 0)."""
    tail = tuple(max(1, int(d)) for d in shape[1:])
    row_bytes = max(1, int(np.prod(tail)) * np.dtype(dtype).itemsize)
    rows = max(1, min(CHUNK_BYTES // row_bytes, int(shape[0]) if len(shape) else 1))
    return (rows,) + tail


def dataset_options(shape, dtype):
    """`h5py.Group.create_dataset` keywords of a checksummed numeric dataset of a store
    (for writers that fill a store file incrementally; see the module doc).
    """
    # An empty dimension is extensible: a chunk cannot exceed a fixed one.
    return {
        "chunks": chunk_shape(shape, dtype),
        "fletcher32": True,
        "maxshape": tuple(d or None for d in shape),
    }


def checksum_attributes(names):
    """The file attributes that mark a store file as checksummed, for its `names`."""
    return {CHECKSUMS_ATTR: CHECKSUMS, NAMES_DIGEST_ATTR: _names_digest(_decode_names(names))}


def _write_h5_atomic(path, arrays, attrs):
    """Writes a store file (atomic) with its checksums (see the module doc); `attrs`'
    own checksum attributes, if any, are replaced by this file's.
    """
    with atomic.atomic_path(path) as tmp, h5py.File(tmp, "w", libver=HDF5_LIBVER) as f:
        for key, value in arrays.items():
            if key == "names":
                f.create_dataset(key, data=value.astype(object), dtype=STRING_DTYPE)
            else:
                value = np.asarray(value)
                f.create_dataset(key, data=value, **dataset_options(value.shape, value.dtype))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs.update(checksum_attributes(arrays["names"]))


def _open_h5(path):
    """Read-only handle without HDF5 file locking: files are complete once renamed into
    place, so readers need no lock (and work on read-only or NFS folders).

    Raises:
      StoreCorruptedError: the file is truncated or not an HDF5 file.
    """
    try:
        return h5py.File(path, "r", locking=False)
    except HDF5_READ_ERRORS as e:
        if _is_io_error(e):
            raise
        raise corruption_error(
            path, f"it cannot be opened: {_hdf5_reason(e)}; the file is truncated or overwritten"
        ) from e


def _read_names(handle, path):
    """The image names of an open file, checked against `names_sha256` if it has one.

    Raises:
      StoreCorruptedError: unreadable names or names not matching their digest.
    """
    try:
        names = _decode_names(handle["names"][()])
        expected = handle.attrs.get(NAMES_DIGEST_ATTR)
    except HDF5_READ_ERRORS as e:
        raise corruption_error(path, f"its 'names' cannot be read: {_hdf5_reason(e)}") from e
    if expected is not None and _names_digest(names) != expected:
        raise corruption_error(
            path, f"its 'names' do not match their SHA-256 ({NAMES_DIGEST_ATTR} attribute)"
        )
    return names


def file_names_and_options(source, what=None):
    """(names, {"float16": bool, "binarized": bool}) of one store file, names verified.

    Args:
      source: a path, or a seekable binary file object (e.g. a Beam ``FileSystems``
        stream of a remote shard).
      what: the file's name in error messages (default: ``source``).

    Raises:
      StoreCorruptedError: the file cannot be opened or its names fail their digest.
    """
    what = what if what is not None else str(source)
    handle = _open_h5(source) if isinstance(source, (str, Path)) else None
    if handle is None:
        try:
            handle = h5py.File(source, "r")
        except HDF5_READ_ERRORS as e:
            raise corruption_error(what, f"it cannot be opened: {_hdf5_reason(e)}") from e
    with handle:
        names = _read_names(handle, what)
        options = {key: bool(handle.attrs.get(key, False)) for key in ("float16", "binarized")}
    return names, options


def _bad_row_ranges(dataset, start, end):
    """[(first, last + 1)] of the chunks of rows [start, end) of `dataset` that fail to
    read (checksum), one chunk at a time.
    """
    step = dataset.chunks[0] if dataset.chunks else max(1, end - start)
    bad = []
    for first in range(start - start % step, end, step):
        last = min(first + step, dataset.shape[0])
        try:
            dataset[first:last]
        except HDF5_READ_ERRORS:
            bad.append((first, last))
    return bad


def _images_of_rows(handle, key, ranges):
    """Image positions (in the file) whose rows of dataset `key` meet `ranges`; None if
    the local offsets needed to tell cannot be read.
    """
    if key in LOCAL_DATASETS:
        try:
            offsets = np.asarray(handle["local_offsets"][()], np.int64)
        except HDF5_READ_ERRORS:
            return None
        images = set()
        for first, last in ranges:
            lo = int(np.searchsorted(offsets, first, side="right")) - 1
            hi = int(np.searchsorted(offsets, last, side="left"))
            images.update(
                k
                for k in range(max(lo, 0), min(hi, len(offsets) - 1))
                if offsets[k + 1] > offsets[k]
            )
        return sorted(images)
    if key == "local_offsets":  # offset k bounds images k - 1 and k
        return sorted(
            {
                k
                for first, last in ranges
                for k in range(first - 1, last)
                if 0 <= k < handle["local_offsets"].shape[0] - 1
            }
        )
    return sorted({k for first, last in ranges for k in range(first, last)})


def read_error(handle, path, key, start, end, error):
    """`StoreCorruptedError` for a failed read of rows [start, end) of dataset `key` of the
    open file `handle` at `path`: names the rows of the bad chunks and their images.
    """
    reason = _hdf5_reason(error)
    try:
        dataset = handle[key]
        ranges = _bad_row_ranges(dataset, start, end) or [(start, end)]
        images = _images_of_rows(handle, key, ranges)
        names = _read_names(handle, path) if images is not None else None
    except StoreCorruptedError:
        ranges, names = [(start, end)], None
    except HDF5_READ_ERRORS:
        ranges, names = [(start, end)], None
    else:
        names = [names[k] for k in images] if names is not None else None
    rows = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:NAMES_IN_MESSAGES])
    checksum = " (fletcher32 checksum)" if "filter" in reason else ""
    return corruption_error(path, f"'{key}' rows {rows} fail to read{checksum}: {reason}", names)


def _read_dataset(handle, path, key):
    """All of dataset `key` (checksums verified by HDF5); StoreCorruptedError if not."""
    try:
        return handle[key][()]
    except HDF5_READ_ERRORS as e:
        if _is_io_error(e):
            raise
        try:
            length = handle[key].shape[0] if handle[key].shape else 1
        except HDF5_READ_ERRORS:
            length = 0
        raise read_error(handle, path, key, 0, length, e) from e


def _read_h5(path):
    """({dataset: array}, attrs) of a whole file, every checksum verified (a file without
    checksums, `attrs[CHECKSUMS_ATTR]` unset, is read as it is).
    """
    with _open_h5(path) as f:
        names = _read_names(f, path)
        arrays = {key: _read_dataset(f, path, key) for key in f.keys() if key != "names"}
        attrs = dict(f.attrs)
    arrays["names"] = np.array(names, dtype=object)
    return arrays, attrs


def _unverified(loaded):
    """The paths of `[(path, (arrays, attrs))]` read from files without checksums."""
    return [path for path, (_, attrs) in loaded if attrs.get(CHECKSUMS_ATTR) != CHECKSUMS]


def _set_aside(part):
    """Renames a corrupted part to `<part>.corrupt` (`.corrupt.N` if taken); returns it."""
    target, count = part.with_name(part.name + CORRUPT_SUFFIX), 0
    while target.exists():
        count += 1
        target = part.with_name(f"{part.name}{CORRUPT_SUFFIX}.{count}")
    part.rename(target)
    return target


def _list_parts(directory):
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PART_PATTERN.match(p.name))


def _decode_names(names):
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def completed_names(directory):
    """Image names in the complete parts of a writer directory (empty set if none).

    Read-only: unlike `FeatureStoreWriter`, creates and deletes nothing.
    """
    done = set()
    for part in _list_parts(directory):
        try:
            with _open_h5(part) as f:
                done.update(_read_names(f, part))
        except StoreCorruptedError:
            continue  # not done: a writer moves it aside and extracts its images again.
    return done


class FeatureStoreWriter:
    """Crash-safe, resumable writer (a directory of atomically written parts).

    Resuming (parts already in `directory`): every part is read once and its checksums
    verified; a corrupted or truncated part is moved aside (`<part>.corrupt`, listed in
    `set_aside` and named in a warning with its images), so that its images are not
    `done` and are extracted again.

    Args:
      directory: parts directory (created if missing).
      float16: store descriptors as float16.
      binarized: also store DELG* packed binary local descriptors.
      flush_every: images per part file.

    Attributes:
      done: names of the images in the complete parts (and those added since).
      set_aside: [(corrupted part, where it was moved, its names or None)].
    """

    def __init__(self, directory, float16=False, binarized=False, flush_every=DEFAULT_FLUSH_EVERY):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.float16 = bool(float16)
        self.binarized = bool(binarized)
        self.flush_every = int(flush_every)
        for stale in self.directory.glob("*" + TMP_SUFFIX):
            stale.unlink()  # Left by a killed run; never a complete part.
        self.done = set()
        self.local_dim = 0
        self.global_dim = 0
        self.set_aside = []
        parts = _list_parts(self.directory)
        unverified = []
        for part in parts:
            try:
                arrays, attrs = _read_h5(part)  # every checksum verified
            except StoreCorruptedError as e:
                self._set_aside(part, e)
                continue
            if attrs.get(CHECKSUMS_ATTR) != CHECKSUMS:
                unverified.append(part)
            self.local_dim = self.local_dim or int(attrs["local_dim"])
            self.global_dim = self.global_dim or int(attrs["global_dim"])
            if bool(attrs["float16"]) != self.float16 or (
                bool(attrs["binarized"]) != self.binarized
            ):
                raise StoreError(
                    f"{part}: written with float16={bool(attrs['float16'])}, "
                    f"binarized={bool(attrs['binarized'])}; this run asks for "
                    f"float16={self.float16}, binarized={self.binarized}. Use the same "
                    "options to resume, or another output directory."
                )
            self.done.update(arrays["names"])
        _warn_unverified(unverified, str(self.directory))
        self._next_part = (int(PART_PATTERN.match(parts[-1].name).group(1)) + 1) if parts else 0
        self._pending = []

    def _set_aside(self, part, error):
        try:
            with _open_h5(part) as f:
                names = _read_names(f, part)
        except StoreCorruptedError:
            names = None
        aside = _set_aside(part)
        self.set_aside.append((part, aside, names))
        which = (
            f"its {len(names)} image(s) {_listed(names)} are"
            if names is not None
            else "its images (names unreadable) are"
        )
        logger.warning(
            "resume: part %s is corrupted (%s); moved it to %s: %s extracted again.",
            part,
            error.what,
            aside,
            which,
        )

    def add(self, name, features):
        """Queues the features (`DelgFeatures` or dict) of one image."""
        if name in self.done:
            raise StoreError(f"image {name!r} is already in the store {self.directory}.")
        get = (lambda k: getattr(features, k)) if not isinstance(features, dict) else features.get
        record = {
            "name": name,
            "image_shape": tuple(get("image_shape")),
            "global_descriptor": get("global_descriptor"),
            "locations": get("locations"),
            "descriptors": get("descriptors"),
            "scores": (get("attention") if get("attention") is not None else get("scores")),
            "scales": get("scales"),
        }
        global_size = np.asarray(record["global_descriptor"]).size
        if global_size and not self.global_dim:
            self.global_dim = int(global_size)
        if len(record["scores"]) and not self.local_dim:
            self.local_dim = int(np.asarray(record["descriptors"]).shape[-1])
        self._pending.append(record)
        self.done.add(name)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self):
        """Writes the queued images as one complete part (atomic)."""
        if not self._pending:
            return
        arrays = _records_to_arrays(
            self._pending, self.float16, self.binarized, self.local_dim, self.global_dim
        )
        path = self.directory / f"part-{self._next_part:06d}.h5"
        _write_h5_atomic(path, arrays, self._attrs(arrays))
        self._next_part += 1
        self._pending = []

    def _attrs(self, arrays):
        return {
            "format_version": FORMAT_VERSION,
            "float16": self.float16,
            "binarized": self.binarized,
            "local_dim": int(arrays["descriptors"].shape[1]),
            "global_dim": int(arrays["global_descriptors"].shape[1])
            if "global_descriptors" in arrays
            else 0,
        }

    def close(self):
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Flush also on errors: everything queued is complete.
        self.close()
        return False


def _merge(arrays_list):
    """Concatenates store arrays of several parts (tolerates parts written before the
    descriptor sizes were known: empty local datasets, no global rows).
    """
    merged = {}
    offsets, base = [np.zeros(1, np.int64)], 0
    for arrays in arrays_list:
        offsets.append(arrays["local_offsets"][1:] + base)
        base += int(arrays["local_offsets"][-1])
    merged["local_offsets"] = np.concatenate(offsets)
    keys = sorted({key for arrays in arrays_list for key in arrays} - {"local_offsets"})
    for key in keys:
        candidates = [a[key] for a in arrays_list if key in a]
        reference = max(candidates, key=lambda v: (v.size > 0, int(np.prod(v.shape[1:]))))
        values = []
        for arrays in arrays_list:
            value = arrays.get(key)
            if value is None:  # a part without global descriptors: zero rows
                value = np.zeros((len(arrays["names"]),) + reference.shape[1:], reference.dtype)
            elif value.shape[1:] != reference.shape[1:] and value.shape[0] == 0:
                value = value.reshape((0,) + reference.shape[1:])
            values.append(value)
        merged[key] = np.concatenate(values)
    return merged


def _reorder(arrays, order):
    """Reorders images (and their local rows) by the index array `order`."""
    offsets = arrays["local_offsets"]
    counts = np.diff(offsets)
    rows = (
        np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
        if len(order)
        else np.zeros(0, np.int64)
    ).astype(np.int64)
    out = {"local_offsets": np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)}
    for key, value in arrays.items():
        if key in ("names", "image_shapes", "global_descriptors"):
            out[key] = value[order]
        elif key in LOCAL_DATASETS:
            out[key] = value[rows]
    return out


def consolidate(parts_directory, output_path, order=None):
    """Merges the complete parts into one HDF5 store (atomic), images sorted by name.

    Args:
      parts_directory: a `FeatureStoreWriter` directory.
      output_path: the single-file store to write.
      order: optional list of names giving the image order (names not in it go last,
        sorted).

    Returns:
      Path of the store.

    Raises:
      StoreCorruptedError: a part fails its checksums (nothing is written).
    """
    parts = _list_parts(parts_directory)
    if not parts:
        raise StoreError(
            f"{parts_directory}: no complete part files (part-NNNNNN.h5); nothing to consolidate."
        )
    loaded = [_read_h5(p) for p in parts]
    _warn_unverified(_unverified(zip(parts, loaded)), str(parts_directory))
    arrays = _merge([a for a, _ in loaded])
    names = list(arrays["names"])
    rank = {n: i for i, n in enumerate(order)} if order is not None else {}
    index = sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), names[i]))
    arrays = _reorder(arrays, np.asarray(index, np.int64))
    _write_h5_atomic(output_path, arrays, loaded[0][1])
    return Path(output_path)


class FeatureStore:
    """Lazy read access to one logical store made of one or many HDF5 files.

    `source` is one of:

    * an `.h5` store file (`OUT/features.h5`);
    * a writer's parts directory (complete `part-NNNNNN.h5` files only);
    * a list of shard files, or a glob of them (`OUT/features-*-of-00004.h5`, the
      `--num_shards` outputs of `python -m delg_tf.extract`); a glob must match every
      shard `features-SSSSS-of-NNNNN.h5` of the N it names.

    Opening reads only names and local offsets, and builds the name -> (file, row)
    index; global descriptors are read by rows and the local features of one image on
    demand, so a +1M-image store is never loaded whole. A name in two files is an
    error naming both. Files are opened read-only without HDF5 file locking (readers
    need no lock on the file system; writers rename complete files into place) and
    at most `MAX_OPEN_FILES` at a time. Reads are thread-safe (re-ranking reads local
    features from a thread pool).

    Attributes:
      files: the HDF5 files, in image order.
      description: the source as named in messages (file, folder, glob).
      names: list of image names (all files, in order).
      attrs: attributes of the first file (format_version, float16, binarized, ...).
      global_dim: global descriptor size (0: no global descriptors).
    """

    def __init__(self, source):
        self.files, self.description = store_files(source)
        self._lock = threading.Lock()
        self._handles = collections.OrderedDict()
        self.names, offsets, self._datasets, shard_of = [], [], [], []
        self.attrs = {}
        self.global_dim = 0
        self._tails = {}  # dataset -> (row shape, dtype, file it is from)
        unverified = []
        for shard, path in enumerate(self.files):
            with _open_h5(path) as f:
                try:
                    names = self._read_file_index(f, path, offsets)
                except HDF5_READ_ERRORS as e:  # e.g. an object header failing its checksum
                    raise corruption_error(
                        path, f"its layout cannot be read: {_hdf5_reason(e)}"
                    ) from e
                if not _is_verified(f):
                    unverified.append(path)
            self.names += names
            shard_of.append(np.full(len(names), shard, np.int32))
        _warn_unverified(unverified, self.description)
        if "global_descriptors" in self._tails:
            self.global_dim = int(self._tails.pop("global_descriptors")[0][0])
        self._shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self._first = np.cumsum([0] + [len(o) - 1 for o in offsets])  # first image per file
        self._offsets = offsets
        self._index = {}
        for k, name in enumerate(self.names):
            other = self._index.setdefault(name, k)
            if other != k:
                first, second = self.files[self._shard[other]], self.files[self._shard[k]]
                where = f"{first} and {second}" if first != second else f"{first} (twice)"
                raise StoreError(
                    f"image {name!r} is in {where}; each image must be in one shard: pass the "
                    "shards of one extraction (same --num_shards), or delete the extra file."
                )

    def _read_file_index(self, f, path, offsets):
        """Reads the names (returned), local offsets (appended to `offsets`), datasets and
        row shapes of the open file `f`.
        """
        if not self.attrs:
            self.attrs = dict(f.attrs)
        missing = [key for key in REQUIRED_DATASETS if key not in f]
        if missing:
            raise StoreError(
                f"{path}: no {missing} dataset(s); expected a feature store "
                "written by `python -m delg_tf.extract`."
            )
        names = _read_names(f, path)
        offsets.append(np.asarray(_read_dataset(f, path, "local_offsets"), np.int64))
        self._datasets.append(frozenset(f.keys()))
        for key in ("global_descriptors",) + LOCAL_DATASETS:
            if key in f:
                self._add_shape(key, f[key], path)
        return names

    def _add_shape(self, key, dataset, path):
        """Records the row shape of dataset `key`; files written before any image had
        features hold empty (0, 0) datasets, others must agree (same extraction).
        """
        tail, dtype = tuple(dataset.shape[1:]), dataset.dtype
        if dataset.shape[0] == 0 and not int(np.prod(tail)):
            self._tails.setdefault(key, (tail, dtype, path))
            return
        known = self._tails.get(key)
        if known is not None and int(np.prod(known[0])) and known[0] != tail:
            raise StoreError(
                f"{path}: '{key}' rows of shape {tail}, but {known[2]} has {known[0]}; the "
                "files of one store must come from one extraction (same model and options)."
            )
        if known is None or not int(np.prod(known[0])):
            self._tails[key] = (tail, dtype, path)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self._index

    def has(self, dataset):
        """True if every file of the store holds `dataset` (e.g. "descriptors_binary")."""
        return all(dataset in keys for keys in self._datasets)

    def index(self, name):
        """Position of image `name` in `names` (exact name; KeyError if absent)."""
        if name not in self._index:
            raise KeyError(f"image {name!r} is not in the store {self.description}.")
        return self._index[name]

    def resolve(self, name):
        """Position of a dataset image name (revisitop names have no extension), or None.

        Tries `name` with each of `IMAGE_NAME_SUFFIXES`, also under a `jpg/` prefix.
        """
        for suffix in IMAGE_NAME_SUFFIXES:
            for candidate in (name + suffix, f"{IMAGE_PREFIX}{name}{suffix}"):
                if candidate in self._index:
                    return self._index[candidate]
        return None

    def _file(self, shard):
        """Open handle of file `shard` (caller holds the lock)."""
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
            handle = self._handles[shard] = _open_h5(self.files[shard])
        else:
            self._handles.move_to_end(shard)
        return handle

    def _row(self, i):
        shard = int(self._shard[i])
        return shard, int(i - self._first[shard])

    @property
    def global_descriptors(self):
        """f32 [M, D] of every image, or None if the store has no global descriptors."""
        return self.global_rows(np.arange(len(self))) if self.global_dim else None

    def global_rows(self, indices):
        """f32 [len(indices), D] global descriptors of images `indices` (positions in
        `names`); zero rows for images of a file without global descriptors.
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        out = np.zeros((indices.size, self.global_dim), np.float32)
        if not self.global_dim:
            return out
        shards = self._shard[indices]
        order = np.argsort(shards, kind="stable")  # grouped by file, one pass
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        with self._lock:
            for where in np.split(order, bounds):
                shard = int(shards[where[0]]) if where.size else None
                if shard is None or "global_descriptors" not in self._datasets[shard]:
                    continue
                rows = indices[where] - self._first[shard]
                out[where] = self._read(
                    shard,
                    "global_descriptors",
                    int(rows.min()),
                    int(rows.max()) + 1,
                    lambda dataset, rows=rows: _read_rows(dataset, rows),
                )
        return out

    def _read(self, shard, key, start, end, read):
        """`read(dataset)` of dataset `key` of file `shard` (caller holds the lock); a
        failed read (checksum, truncation) raises StoreCorruptedError naming the file and
        the images of the bad rows among [start, end).
        """
        f = self._file(shard)
        try:
            return read(f[key])
        except HDF5_READ_ERRORS as e:
            if _is_io_error(e):
                raise
            raise read_error(f, self.files[shard], key, start, end, e) from e

    def local(self, i, binary=False):
        """Local features of image `i` (position in `names`) as numpy arrays.

        Returns:
          (locations f32 [N, 2] (y, x) in original-image pixels, descriptors f32 [N, d],
          or with `binary` the DELG* packed bits uint8 [N, d/8]).
        """
        key = BINARY_DESCRIPTORS if binary else "descriptors"
        arrays = self.local_arrays(i, ("locations", key))
        dtype = np.uint8 if binary else np.float32
        return arrays["locations"].astype(np.float32), arrays[key].astype(dtype)

    def empty_local(self, binary=False):
        """The `local` arrays of an image without local features."""
        key = BINARY_DESCRIPTORS if binary else "descriptors"
        tail = self._tails[key][0] if key in self._tails else (0,)
        return (
            np.zeros((0, 2), np.float32),
            np.zeros((0,) + tail, np.uint8 if binary else np.float32),
        )

    def local_arrays(self, i, keys=LOCAL_DATASETS):
        """{dataset: rows of image `i`} for the local datasets `keys` the store has."""
        shard, row = self._row(int(i))
        start, end = (int(v) for v in self._offsets[shard][row : row + 2])
        out = {}
        with self._lock:
            f = self._file(shard) if end > start else None
            for key in keys:
                if key not in self._tails:
                    continue
                tail, dtype, _ = self._tails[key]
                if f is None or key not in self._datasets[shard]:
                    out[key] = np.zeros((0,) + tail, dtype)
                else:
                    out[key] = np.asarray(
                        self._read(shard, key, start, end, lambda d: d[start:end])
                    )
        return out

    def image_shape(self, i):
        """(height, width, channels) of image `i` as extracted."""
        shard, row = self._row(int(i))
        with self._lock:
            value = self._read(shard, "image_shapes", row, row + 1, lambda d: d[row])
        return tuple(int(v) for v in value)

    def get(self, name):
        """Features of one image: dict with global_descriptor, locations (y, x),
        keypoints (x, y), descriptors (float32), scores, scales, image_shape and,
        if stored, descriptors_binary.
        """
        i = self.index(name)
        out = {"image_shape": self.image_shape(i)}
        if self.global_dim:
            out["global_descriptor"] = self.global_rows([i])[0]
        out.update(self.local_arrays(i))
        out["descriptors"] = out["descriptors"].astype(np.float32)
        out["keypoints"] = out["locations"][:, ::-1].copy()
        return out

    def arrays(self):
        """All datasets as numpy arrays (the layout of the module doc; reads everything)."""
        if len(self.files) == 1:
            return _read_h5(self.files[0])[0]
        return _merge([_read_h5(p)[0] for p in self.files])

    def select(self, names, binary=False, allow_missing=False, what="feature store"):
        """`StoreSelection` of dataset images `names` (see there)."""
        return StoreSelection(self, names, binary, allow_missing, what)

    def close(self):
        """Closes the open HDF5 files (the store reopens them if read again)."""
        with self._lock:
            while self._handles:
                self._handles.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StoreSelection:
    """Features of a list of dataset images from a `FeatureStore`, in the list's order.

    Global descriptors of `names` are read at once (`global_`); local features on
    demand (`local`), so re-ranking reads the shortlisted images only.

    Args:
      store: an open `FeatureStore`.
      names: image names in dataset order (revisitop `imlist`/`qimlist`, without
        extension; see `FeatureStore.resolve` for the suffixes and prefix tried).
      binary: serve packed-bit descriptors (`descriptors_binary`, DELG*).
      allow_missing: images absent from the store (e.g. failed extraction, listed in
        the extractor's `errors.tsv`) get a zero global descriptor and no local
        features and are listed in `missing`; otherwise a missing image is an error.
      what: name of the flag/file for error messages.
      owns_store: `close` also closes the store.

    Attributes:
      global_: f32 [len(names), D].
      missing: names not found in the store.

    Raises:
      StoreError: images missing (unless `allow_missing`), no global descriptors, or
        no `descriptors_binary` with `binary`.
    """

    def __init__(
        self,
        store,
        names,
        binary=False,
        allow_missing=False,
        what="feature store",
        owns_store=False,
    ):
        self.store = store
        self.binary = bool(binary)
        self._owns_store = owns_store
        self._rows = [store.resolve(name) for name in names]
        self.missing = [n for n, r in zip(names, self._rows) if r is None]
        where = store.description
        if self.missing and not allow_missing:
            raise StoreError(
                f"{what}: {len(self.missing)} image(s) are not in {where}, e.g. "
                f"{self.missing[:3]} (tried suffixes {IMAGE_NAME_SUFFIXES} and a "
                f"{IMAGE_PREFIX} prefix); extract them first or check the store matches the "
                "dataset."
            )
        if not store.global_dim:
            raise StoreError(
                f"{what}: {where} has no global descriptors; extract with global features "
                "enabled (a local_and_global or global export)."
            )
        key = BINARY_DESCRIPTORS if binary else "descriptors"
        if not store.has(key):
            raise StoreError(
                f"{what}: {where} has no '{key}' dataset; extract with binarisation enabled "
                "(--binarize) or evaluate without binary descriptors."
            )
        self._key = key
        found = [k for k, r in enumerate(self._rows) if r is not None]
        self.global_ = np.zeros((len(names), store.global_dim), np.float32)
        self.global_[found] = store.global_rows([self._rows[k] for k in found])

    def __len__(self):
        return len(self._rows)

    def local(self, i):
        """(locations f32 [N, 2] (y, x), descriptors) of image `i` (position in `names`);
        no rows for a missing image.
        """
        row = self._rows[int(i)]
        if row is None:
            return self.store.empty_local(self.binary)
        return self.store.local(row, self.binary)

    def close(self):
        if self._owns_store:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_selection(source, names, binary=False, allow_missing=False, what="feature store"):
    """Opens the store `source` (see `FeatureStore`) and selects `names` from it.

    Returns:
      A `StoreSelection` that closes the store when closed.
    """
    store = FeatureStore(source)
    try:
        return StoreSelection(store, names, binary, allow_missing, what, owns_store=True)
    except BaseException:
        store.close()
        raise


def _read_rows(dataset, rows):
    """dataset[rows] as float32 for `rows` in any order, read in slabs of at most `READ_BLOCK_ROWS`
    rows (h5py point selections are slow; one slab of the whole file may not fit).
    """
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.zeros((rows.size,) + tuple(dataset.shape[1:]), np.float32)
    k = 0
    while k < rows.size:
        start = int(rows[order[k]])
        end = k + int(np.searchsorted(rows[order[k:]], start + READ_BLOCK_ROWS))
        block = np.asarray(dataset[start : int(rows[order[end - 1]]) + 1], np.float32)
        out[order[k:end]] = block[rows[order[k:end]] - start]
        k = end
    return out


def _shard_pattern_gaps(files):
    """Shard files `features-SSSSS-of-NNNNN.h5` missing from `files` (for each N seen)."""
    seen = {}
    for path in files:
        match = SHARD_PATTERN.match(path.name)
        if match:
            seen.setdefault((path.parent, match.group(1), int(match.group(3))), set()).add(
                int(match.group(2))
            )
    gaps = []
    for (folder, stem, count), indices in sorted(seen.items()):
        gaps += [
            folder / f"{stem}-{i:05d}-of-{count:05d}.h5" for i in range(count) if i not in indices
        ]
    return gaps


def store_files(source):
    """The HDF5 files of a store `source` (see `FeatureStore`) and a description of it.

    Returns:
      (list of Path in image order, str for messages).

    Raises:
      StoreError: nothing there, no complete part file, a glob matching nothing or
        missing some shards of the N it names.
    """
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        if not files:
            raise StoreError(
                "an empty list of feature store files; pass an .h5 store, a "
                "parts directory or the shard files of an extraction."
            )
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise StoreError(
                f"feature store shard(s) {absent[:3]} do not exist; expected .h5 "
                "files written by `python -m delg_tf.extract`."
            )
        return files, (
            str(files[0]) if len(files) == 1 else f"{len(files)} shard files ({files[0]}, ...)"
        )
    path = Path(source)
    if path.is_dir():
        parts = _list_parts(path)
        if not parts:
            raise StoreError(
                f"{path}: no complete part files; expected a store directory "
                "written by FeatureStoreWriter or an .h5 store file."
            )
        return parts, str(path)
    if path.is_file():
        return [path], str(path)
    if any(c in str(path) for c in GLOB_CHARACTERS):
        files = sorted(
            Path(p)
            for p in glob.glob(str(path))
            if Path(p).is_file() and not p.endswith(TMP_SUFFIX)
        )
        if not files:
            raise StoreError(
                f"feature store pattern {path} matches no file; expected shard "
                "files such as OUT/features-00000-of-00004.h5 written by "
                "`python -m delg_tf.extract --num_shards=4`."
            )
        gaps = _shard_pattern_gaps(files)
        if gaps:
            raise StoreError(
                f"feature store pattern {path} misses {len(gaps)} shard(s), e.g. "
                f"{gaps[0]}; finish their extraction (same --num_shards) or pass "
                "the files to use explicitly."
            )
        return files, str(path)
    raise StoreError(
        f"feature store {path} does not exist; expected an .h5 file written by "
        "`python -m delg_tf.extract`, a parts directory, or a glob of shard files "
        "(OUT/features-*-of-*.h5)."
    )
