"""Official per-image feature files: `.delf` (DelfFeatures) and `.delg_global` (DatumProto).

Field usage as tensorflow/models research/delf `feature_io.py` / `datum_io.py`:

* DelfFeatures: one `feature` per keypoint with `y` = locations[i, 0],
  `x` = locations[i, 1], `scale`, `orientation` (0 when not given), `strength` =
  attention, `descriptor` = DatumProto of the descriptor row.
* DatumProto: `shape.dim` = array shape, values in `float_list` (float arrays) or
  `uint32_list` (unsigned integer arrays).

Files are written atomically (temporary file + rename). No TensorFlow import.
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from delg_tf.protos import datum_pb2, feature_pb2

DELF_EXTENSION = ".delf"
DELG_GLOBAL_EXTENSION = ".delg_global"
DELG_LOCAL_EXTENSION = ".delg_local"


def array_to_datum(array):
    """numpy array -> DatumProto (uint32 list for unsigned ints, float list otherwise)."""
    array = np.asarray(array)
    datum = datum_pb2.DatumProto()
    if array.dtype in (np.uint8, np.uint16, np.uint32):
        datum.uint32_list.value.extend(array.astype(np.uint32).flat)
    else:
        datum.float_list.value.extend(array.astype(np.float32).flat)
    datum.shape.dim.extend(array.shape)
    return datum


def datum_to_array(datum):
    """DatumProto -> numpy array (float32 or uint32) with its shape."""
    if datum.HasField("uint32_list"):
        values = np.asarray(datum.uint32_list.value, np.uint32)
    else:
        values = np.asarray(datum.float_list.value, np.float32)
    return values.reshape(tuple(datum.shape.dim))


def _write_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_datum(path, array):
    """Writes a `.delg_global` (or any DatumProto) file."""
    _write_atomic(path, array_to_datum(array).SerializeToString())


def read_datum(path):
    """Reads a DatumProto file into a numpy array."""
    datum = datum_pb2.DatumProto()
    try:
        datum.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError (a Message.Error)
        raise ValueError(f"{path}: not a DatumProto file ({e}); expected a file written by "
                         "datum_io.WriteToFile / delg_tf.extraction.delf_io.write_datum.") from e
    return datum_to_array(datum)


def arrays_to_delf_features(locations, scales, descriptors, attention, orientations=None):
    """numpy arrays -> DelfFeatures proto (official field usage)."""
    locations = np.asarray(locations, np.float32).reshape(-1, 2)
    num = locations.shape[0]
    scales = np.asarray(scales, np.float32).reshape(-1)
    attention = np.asarray(attention, np.float32).reshape(-1)
    descriptors = np.asarray(descriptors)
    if orientations is None:
        orientations = np.zeros([num], np.float32)
    sizes = {"scales": scales.shape[0], "descriptors": descriptors.shape[0] if num else 0,
             "attention": attention.shape[0], "orientations": len(orientations)}
    wrong = {k: v for k, v in sizes.items() if v != num}
    if wrong:
        raise ValueError(f"DelfFeatures arrays must all have {num} rows (locations), received "
                         f"{wrong}.")
    features = feature_pb2.DelfFeatures()
    for i in range(num):
        feature = features.feature.add()
        feature.y = locations[i, 0]
        feature.x = locations[i, 1]
        feature.scale = scales[i]
        feature.orientation = orientations[i]
        feature.strength = attention[i]
        feature.descriptor.CopyFrom(array_to_datum(descriptors[i]))
    return features


def delf_features_to_arrays(features):
    """DelfFeatures proto -> (locations [N,2] (y,x), scales, descriptors, attention,
    orientations)."""
    num = len(features.feature)
    if num == 0:
        return (np.zeros([0, 2], np.float32), np.zeros([0], np.float32),
                np.zeros([0, 0], np.float32), np.zeros([0], np.float32),
                np.zeros([0], np.float32))
    locations = np.array([[f.y, f.x] for f in features.feature], np.float32)
    scales = np.array([f.scale for f in features.feature], np.float32)
    attention = np.array([f.strength for f in features.feature], np.float32)
    orientations = np.array([f.orientation for f in features.feature], np.float32)
    descriptors = np.stack([datum_to_array(f.descriptor) for f in features.feature])
    return locations, scales, descriptors, attention, orientations


def write_delf(path, locations, scales, descriptors, attention, orientations=None):
    """Writes a `.delf` file (official `feature_io.WriteToFile` format)."""
    features = arrays_to_delf_features(locations, scales, descriptors, attention, orientations)
    _write_atomic(path, features.SerializeToString())


def read_delf(path):
    """Reads a `.delf` file: (locations, scales, descriptors, attention, orientations)."""
    features = feature_pb2.DelfFeatures()
    try:
        features.ParseFromString(Path(path).read_bytes())
    except Exception as e:
        raise ValueError(f"{path}: not a DelfFeatures file ({e}); expected a .delf file "
                         "written by feature_io.WriteToFile or delf_io.write_delf.") from e
    return delf_features_to_arrays(features)
