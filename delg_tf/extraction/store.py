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

Reading: `FeatureStore` is the one reader of this layout. It opens a store file, a
parts directory, or the shard files of `extract --num_shards` (a list or a glob) as
one logical store, lazily: names and offsets at open, global descriptors by rows,
local features of one image on demand, as plain numpy arrays. `StoreSelection`
(`open_selection`) maps dataset image names (revisitop lists, no extension) to store
rows for evaluation, re-ranking and the demo.
"""

import collections
import glob
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from delg_tf import atomic
from delg_tf.extraction import binarize

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


class StoreError(ValueError):
    """A feature store is missing, inconsistent or of another format."""


def _records_to_arrays(records, float16, binarized, local_dim=0, global_dim=0):
    """Concatenates a list of record dicts into the store layout (numpy).

    Images without a global descriptor (e.g. too small to extract) get a zero row
    when the store has global descriptors; images without local features get no rows.
    """
    float_type = np.float16 if float16 else np.float32
    counts = [len(r["scores"]) for r in records]
    arrays = {"names": np.array([r["name"] for r in records], dtype=object),
              "image_shapes": np.array([r["image_shape"] for r in records],
                                       np.int32).reshape(-1, 3),
              "local_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
    if global_dim:
        rows = np.zeros([len(records), global_dim], np.float32)
        for k, r in enumerate(records):
            value = np.asarray(r["global_descriptor"], np.float32).reshape(-1)
            if value.size not in (0, global_dim):
                raise StoreError(f"image {r['name']!r}: global descriptor of size {value.size}, "
                                 f"expected {global_dim} like the rest of the store.")
            if value.size:
                rows[k] = value
        arrays["global_descriptors"] = rows.astype(float_type)

    def cat(key, shape_tail, dtype):
        parts = [np.asarray(r[key], dtype).reshape((-1,) + shape_tail)
                 for r, n in zip(records, counts) if n]
        return np.concatenate(parts) if parts else np.zeros((0,) + shape_tail, dtype)

    arrays["locations"] = cat("locations", (2,), np.float32)
    arrays["scores"] = cat("scores", (), np.float32)
    arrays["scales"] = cat("scales", (), np.float32)
    descriptors = cat("descriptors", (local_dim,), np.float32)
    arrays["descriptors"] = descriptors.astype(float_type)
    if binarized:
        arrays["descriptors_binary"] = binarize.pack_binary(descriptors)
    return arrays


def _write_h5_atomic(path, arrays, attrs):
    with atomic.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            if key == "names":
                f.create_dataset(key, data=value.astype(object), dtype=STRING_DTYPE)
            else:
                f.create_dataset(key, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value


def _open_h5(path):
    """Read-only handle without HDF5 file locking: files are complete once renamed into
    place, so readers need no lock (and work on read-only or NFS folders)."""
    return h5py.File(path, "r", locking=False)


def _read_h5(path):
    with _open_h5(path) as f:
        arrays = {key: f[key][()] for key in f.keys()}
        attrs = dict(f.attrs)
    arrays["names"] = np.array([n.decode("utf-8") if isinstance(n, bytes) else n
                                for n in arrays["names"]], dtype=object)
    return arrays, attrs


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
        with _open_h5(part) as f:
            done.update(_decode_names(f["names"][()]))
    return done


class FeatureStoreWriter:
    """Crash-safe, resumable writer (a directory of atomically written parts).

    Args:
      directory: parts directory (created if missing).
      float16: store descriptors as float16.
      binarized: also store DELG* packed binary local descriptors.
      flush_every: images per part file.
    """

    def __init__(self, directory, float16=False, binarized=False,
                 flush_every=DEFAULT_FLUSH_EVERY):
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
        parts = _list_parts(self.directory)
        for part in parts:
            with _open_h5(part) as f:
                self.local_dim = self.local_dim or int(f.attrs["local_dim"])
                self.global_dim = self.global_dim or int(f.attrs["global_dim"])
                if bool(f.attrs["float16"]) != self.float16 or (
                        bool(f.attrs["binarized"]) != self.binarized):
                    raise StoreError(
                        f"{part}: written with float16={bool(f.attrs['float16'])}, "
                        f"binarized={bool(f.attrs['binarized'])}; this run asks for "
                        f"float16={self.float16}, binarized={self.binarized}. Use the same "
                        "options to resume, or another output directory.")
                self.done.update(_decode_names(f["names"][()]))
        self._next_part = (int(PART_PATTERN.match(parts[-1].name).group(1)) + 1) if parts else 0
        self._pending = []

    def add(self, name, features):
        """Queues the features (`DelgFeatures` or dict) of one image."""
        if name in self.done:
            raise StoreError(f"image {name!r} is already in the store {self.directory}.")
        get = (lambda k: getattr(features, k)) if not isinstance(features, dict) else features.get
        record = {"name": name, "image_shape": tuple(get("image_shape")),
                  "global_descriptor": get("global_descriptor"),
                  "locations": get("locations"), "descriptors": get("descriptors"),
                  "scores": (get("attention") if get("attention") is not None
                             else get("scores")),
                  "scales": get("scales")}
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
        arrays = _records_to_arrays(self._pending, self.float16, self.binarized,
                                    self.local_dim, self.global_dim)
        path = self.directory / f"part-{self._next_part:06d}.h5"
        _write_h5_atomic(path, arrays, self._attrs(arrays))
        self._next_part += 1
        self._pending = []

    def _attrs(self, arrays):
        return {"format_version": FORMAT_VERSION, "float16": self.float16,
                "binarized": self.binarized,
                "local_dim": int(arrays["descriptors"].shape[1]),
                "global_dim": int(arrays["global_descriptors"].shape[1])
                if "global_descriptors" in arrays else 0}

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
    descriptor sizes were known: empty local datasets, no global rows)."""
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
    rows = (np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order])
            if len(order) else np.zeros(0, np.int64)).astype(np.int64)
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
    """
    parts = _list_parts(parts_directory)
    if not parts:
        raise StoreError(f"{parts_directory}: no complete part files (part-NNNNNN.h5); "
                         "nothing to consolidate.")
    loaded = [_read_h5(p) for p in parts]
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
        for shard, path in enumerate(self.files):
            with _open_h5(path) as f:
                if not self.attrs:
                    self.attrs = dict(f.attrs)
                missing = [key for key in REQUIRED_DATASETS if key not in f]
                if missing:
                    raise StoreError(f"{path}: no {missing} dataset(s); expected a feature store "
                                     "written by `python -m delg_tf.extract`.")
                names = _decode_names(f["names"][()])
                offsets.append(np.asarray(f["local_offsets"][()], np.int64))
                self._datasets.append(frozenset(f.keys()))
                for key in ("global_descriptors",) + LOCAL_DATASETS:
                    if key in f:
                        self._add_shape(key, f[key], path)
            self.names += names
            shard_of.append(np.full(len(names), shard, np.int32))
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
                where = (f"{first} and {second}" if first != second else f"{first} (twice)")
                raise StoreError(
                    f"image {name!r} is in {where}; each image must be in one shard: pass the "
                    "shards of one extraction (same --num_shards), or delete the extra file.")

    def _add_shape(self, key, dataset, path):
        """Records the row shape of dataset `key`; files written before any image had
        features hold empty (0, 0) datasets, others must agree (same extraction)."""
        tail, dtype = tuple(dataset.shape[1:]), dataset.dtype
        if dataset.shape[0] == 0 and not int(np.prod(tail)):
            self._tails.setdefault(key, (tail, dtype, path))
            return
        known = self._tails.get(key)
        if known is not None and int(np.prod(known[0])) and known[0] != tail:
            raise StoreError(
                f"{path}: '{key}' rows of shape {tail}, but {known[2]} has {known[0]}; the "
                "files of one store must come from one extraction (same model and options).")
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
        `names`); zero rows for images of a file without global descriptors."""
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
                out[where] = _read_rows(self._file(shard)["global_descriptors"], rows)
        return out

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
        return (np.zeros((0, 2), np.float32),
                np.zeros((0,) + tail, np.uint8 if binary else np.float32))

    def local_arrays(self, i, keys=LOCAL_DATASETS):
        """{dataset: rows of image `i`} for the local datasets `keys` the store has."""
        shard, row = self._row(int(i))
        start, end = (int(v) for v in self._offsets[shard][row:row + 2])
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
                    out[key] = np.asarray(f[key][start:end])
        return out

    def image_shape(self, i):
        """(height, width, channels) of image `i` as extracted."""
        shard, row = self._row(int(i))
        with self._lock:
            return tuple(int(v) for v in self._file(shard)["image_shapes"][row])

    def get(self, name):
        """Features of one image: dict with global_descriptor, locations (y, x),
        keypoints (x, y), descriptors (float32), scores, scales, image_shape and,
        if stored, descriptors_binary."""
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

    def __init__(self, store, names, binary=False, allow_missing=False,
                 what="feature store", owns_store=False):
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
                "dataset.")
        if not store.global_dim:
            raise StoreError(
                f"{what}: {where} has no global descriptors; extract with global features "
                "enabled (a local_and_global or global export).")
        key = BINARY_DESCRIPTORS if binary else "descriptors"
        if not store.has(key):
            raise StoreError(
                f"{what}: {where} has no '{key}' dataset; extract with binarisation enabled "
                "(--binarize) or evaluate without binary descriptors.")
        self._key = key
        found = [k for k, r in enumerate(self._rows) if r is not None]
        self.global_ = np.zeros((len(names), store.global_dim), np.float32)
        self.global_[found] = store.global_rows([self._rows[k] for k in found])

    def __len__(self):
        return len(self._rows)

    def local(self, i):
        """(locations f32 [N, 2] (y, x), descriptors) of image `i` (position in `names`);
        no rows for a missing image."""
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
    rows (h5py point selections are slow; one slab of the whole file may not fit)."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.zeros((rows.size,) + tuple(dataset.shape[1:]), np.float32)
    k = 0
    while k < rows.size:
        start = int(rows[order[k]])
        end = k + int(np.searchsorted(rows[order[k:]], start + READ_BLOCK_ROWS))
        block = np.asarray(dataset[start:int(rows[order[end - 1]]) + 1], np.float32)
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
                int(match.group(2)))
    gaps = []
    for (folder, stem, count), indices in sorted(seen.items()):
        gaps += [folder / f"{stem}-{i:05d}-of-{count:05d}.h5"
                 for i in range(count) if i not in indices]
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
            raise StoreError("an empty list of feature store files; pass an .h5 store, a "
                             "parts directory or the shard files of an extraction.")
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise StoreError(f"feature store shard(s) {absent[:3]} do not exist; expected .h5 "
                             "files written by `python -m delg_tf.extract`.")
        return files, (str(files[0]) if len(files) == 1
                       else f"{len(files)} shard files ({files[0]}, ...)")
    path = Path(source)
    if path.is_dir():
        parts = _list_parts(path)
        if not parts:
            raise StoreError(f"{path}: no complete part files; expected a store directory "
                             "written by FeatureStoreWriter or an .h5 store file.")
        return parts, str(path)
    if path.is_file():
        return [path], str(path)
    if any(c in str(path) for c in GLOB_CHARACTERS):
        files = sorted(Path(p) for p in glob.glob(str(path))
                       if Path(p).is_file() and not p.endswith(TMP_SUFFIX))
        if not files:
            raise StoreError(f"feature store pattern {path} matches no file; expected shard "
                             "files such as OUT/features-00000-of-00004.h5 written by "
                             "`python -m delg_tf.extract --num_shards=4`.")
        gaps = _shard_pattern_gaps(files)
        if gaps:
            raise StoreError(f"feature store pattern {path} misses {len(gaps)} shard(s), e.g. "
                             f"{gaps[0]}; finish their extraction (same --num_shards) or pass "
                             "the files to use explicitly.")
        return files, str(path)
    raise StoreError(f"feature store {path} does not exist; expected an .h5 file written by "
                     "`python -m delg_tf.extract`, a parts directory, or a glob of shard files "
                     "(OUT/features-*-of-*.h5).")
