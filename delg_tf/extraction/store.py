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
"""

import os
import re
from pathlib import Path

import h5py
import numpy as np

from delg_tf.extraction import binarize

FORMAT_VERSION = 1
PART_PATTERN = re.compile(r"^part-(\d{6})\.h5$")
TMP_SUFFIX = ".tmp"
DEFAULT_FLUSH_EVERY = 64
LOCAL_DATASETS = ("locations", "descriptors", "descriptors_binary", "scores", "scales")
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
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            if key == "names":
                f.create_dataset(key, data=value.astype(object), dtype=STRING_DTYPE)
            else:
                f.create_dataset(key, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_h5(path):
    with h5py.File(path, "r") as f:
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
        with h5py.File(part, "r") as f:
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
            with h5py.File(part, "r") as f:
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
    """Read access to a store file or a writer's parts directory (complete parts only).

    Attributes:
      names: list of image names.
      global_descriptors: f32[M, D] or None.
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            parts = _list_parts(path)
            if not parts:
                raise StoreError(f"{path}: no complete part files; expected a store directory "
                                 "written by FeatureStoreWriter or an .h5 store file.")
            loaded = [_read_h5(p) for p in parts]
            self._arrays = _merge([a for a, _ in loaded])
            self.attrs = loaded[0][1]
        elif path.is_file():
            self._arrays, self.attrs = _read_h5(path)
        else:
            raise StoreError(f"feature store {path} does not exist; expected an .h5 file "
                             "written by `python -m delg_tf.extract`.")
        self.path = path
        self.names = list(self._arrays["names"])
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self._index

    @property
    def global_descriptors(self):
        value = self._arrays.get("global_descriptors")
        return None if value is None else value.astype(np.float32)

    def arrays(self):
        """All datasets as numpy arrays (the layout of the module doc)."""
        return dict(self._arrays)

    def get(self, name):
        """Features of one image: dict with global_descriptor, locations (y, x),
        keypoints (x, y), descriptors (float32), scores, scales, image_shape and,
        if stored, descriptors_binary."""
        if name not in self._index:
            raise KeyError(f"image {name!r} is not in the store {self.path}.")
        i = self._index[name]
        start, end = self._arrays["local_offsets"][i:i + 2]
        out = {"image_shape": tuple(self._arrays["image_shapes"][i])}
        if "global_descriptors" in self._arrays:
            out["global_descriptor"] = self._arrays["global_descriptors"][i].astype(np.float32)
        for key in LOCAL_DATASETS:
            if key in self._arrays:
                out[key] = self._arrays[key][start:end]
        out["descriptors"] = out["descriptors"].astype(np.float32)
        out["keypoints"] = out["locations"][:, ::-1].copy()
        return out
