"""Official per-image feature files: `.delf` (DelfFeatures) and `.delg_global` (DatumProto).

Field usage as tensorflow/models research/delf `feature_io.py` / `datum_io.py`:

* DelfFeatures: one `feature` per keypoint with `y` = locations[i, 0],
  `x` = locations[i, 1], `scale`, `orientation` (0 when not given), `strength` =
  attention, `descriptor` = DatumProto of the descriptor row.
* DatumProto: `shape.dim` = array shape, values in `float_list` (float arrays) or
  `uint32_list` (unsigned integer arrays).

Files are written atomically (temporary file + rename). No TensorFlow import.

Checksums: a file written here begins with one extra length-delimited field (number
`CHECKSUM_FIELD_NUMBER`, unknown to the official messages, so official readers skip it)
holding the SHA-256 of the rest of the file; the readers check it and refuse a file
whose bytes changed or that was truncated (`FeatureFileCorruptedError`, one line naming
the file and the fix). Files without it (official tools, older delg_tf) are read as
they are: no verification possible (logged once).

Per-image files of many images go to `<folder>/<relative path>.delf` (and
`.delg_global`), the relative path being `relative_output_path(image name)`:
image names from a list file may be absolute or hold `..`, and must never put a
file outside `<folder>` (see `relative_output_path` and `official_file_bases`).
"""

import hashlib
import logging
import re
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np

from delg_tf.atomic import write_bytes_atomic
from delg_tf.protos import datum_pb2, feature_pb2

logger = logging.getLogger(__name__)

DELF_EXTENSION = ".delf"
DELG_GLOBAL_EXTENSION = ".delg_global"
DELG_LOCAL_EXTENSION = ".delg_local"
# Extensions of the files `official_file_bases` plans for each image.
PER_IMAGE_EXTENSIONS = (DELF_EXTENSION, DELG_GLOBAL_EXTENSION)
# Both separators split image names, whatever the OS (names of lists made on Windows).
_NAME_SEPARATORS = re.compile(r"[\\/]+")
# A leading Windows drive ("C:"), dropped like the root.
_DRIVE = re.compile(r"^[A-Za-z]:")
_PARENT = ".."
_CURRENT = "."
# The checksum field (see the module doc): the largest protobuf field number, far from
# any official field; wire type 2 (length-delimited), a SHA-256 digest.
CHECKSUM_FIELD_NUMBER = 2**29 - 1
_LENGTH_DELIMITED = 2
_DIGEST_BYTES = hashlib.sha256().digest_size
_unverified_logged = []


def _varint(value):
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# The bytes before the digest: the field's tag, then the digest length.
CHECKSUM_PREFIX = _varint(CHECKSUM_FIELD_NUMBER << 3 | _LENGTH_DELIMITED) + _varint(_DIGEST_BYTES)


class FeatureFileCorruptedError(ValueError):
    """A `.delf` / `.delg_global` file fails its checksum or cannot be parsed."""


def with_checksum(body: bytes) -> bytes:
    """The file bytes of a serialised message: the checksum field, then `body`."""
    return CHECKSUM_PREFIX + hashlib.sha256(body).digest() + body


def _corrupted(path, what, reason):
    return FeatureFileCorruptedError(
        f"{path}: corrupted {what} file ({reason}); the features of its image cannot be "
        "trusted: re-extract that image to rewrite it (`python -m delg_tf.extract "
        "--write_delf` into a new --output_dir, or the official extract_features.py)."
    )


def verified_body(path, what):
    """The message bytes of file `path` (a `what` file), its checksum checked if it has one.

    Raises:
      FeatureFileCorruptedError: the checksum does not match (bytes changed, truncated).
    """
    data = Path(path).read_bytes()
    if not data.startswith(CHECKSUM_PREFIX):
        if not _unverified_logged:
            _unverified_logged.append(path)
            logger.info(
                "%s has no checksum (written by the official tools or an older "
                "delg_tf): no verification possible; read as it is (the same for "
                "other such files).",
                path,
            )
        return data
    start = len(CHECKSUM_PREFIX)
    digest, body = data[start : start + _DIGEST_BYTES], data[start + _DIGEST_BYTES :]
    if hashlib.sha256(body).digest() != digest:
        raise _corrupted(
            path,
            what,
            f"its SHA-256 checksum does not match its {len(data)} "
            "bytes: bytes changed or the file is truncated",
        )
    return body


def relative_output_path(name):
    r"""Safe relative path (a `PurePosixPath`) for the per-image files of image `name`.

    Deterministic, keeps names recognisable and never leaves the output folder:

    * `/` and `\\` both separate segments (whatever the OS);
    * a leading drive (`C:`) and the root (`/`, `//server/`) are dropped:
      `/data/imgs/a.jpg` -> `data/imgs/a.jpg`;
    * empty and `.` segments are dropped; `..` removes the segment before it and is
      dropped at the top (lexical resolution clamped at the output folder, like
      `os.path.normpath` of a path under `/`): `imgs/../a.jpg` -> `a.jpg`,
      `../../shared/a.jpg` -> `shared/a.jpg`;
    * every other character, unicode included, is kept as it is (no normalisation).

    Raises:
      ValueError: nothing is left (`/`, `..`, empty) or `name` holds a NUL character.
    """
    text = str(name)
    if "\0" in text:
        raise ValueError(
            f"image name {name!r} holds a NUL character; no file can be named "
            "after it: fix the image list."
        )
    segments = []
    for segment in _NAME_SEPARATORS.split(_DRIVE.sub("", text, count=1)):
        if segment == _PARENT:
            if segments:
                segments.pop()
        elif segment and segment != _CURRENT:
            segments.append(segment)
    if not segments:
        raise ValueError(
            f"image name {name!r} names no file (nothing is left once the root, "
            "'.' and '..' segments are resolved): fix the image list."
        )
    return PurePosixPath(*segments)


def _collision_key(relative):
    """Same key = same file on a case-insensitive or Unicode-normalising file system."""
    return unicodedata.normalize("NFC", str(relative)).casefold()


def official_file_bases(names, folder="delf"):
    """{image name: relative base path} of the per-image files, refusing any clash.

    The base of image `name` is `relative_output_path(name)`; its files are the base
    plus each of `PER_IMAGE_EXTENSIONS`. Two images clash (and are refused, never
    silently overwritten or renamed) when their files would be the same file --
    compared case-insensitively and after Unicode NFC normalisation, so the output is
    the same on every file system -- or when a file of one would have to be a folder
    of the other (`a` -> `a.delf`, `a.delf/b.jpg` -> `a.delf/b.jpg.delf`).

    Args:
      names: image names (the store's names; unique).
      folder: the output folder, only named in the error message.

    Raises:
      ValueError: a name maps to no file, or two names clash; the message names both
        and the fix.
    """
    bases, owners, folders = {}, {}, {}
    for name in names:
        base = relative_output_path(name)
        bases[name] = base
        key = _collision_key(base)
        if key in owners:
            raise ValueError(
                f"images {owners[key]!r} and {name!r} would both be written to "
                f"{folder}/{base}{DELF_EXTENSION} (names are mapped inside the folder: root "
                "and drive dropped, '..' resolved, case and Unicode form ignored); rename "
                "one of them in the image list."
            )
        owners[key] = name
        for parent in list(base.parents)[:-1]:
            folders.setdefault(_collision_key(parent), name)
    for name, base in bases.items():
        for extension in PER_IMAGE_EXTENSIONS:
            other = folders.get(_collision_key(f"{base}{extension}"))
            if other is not None:
                raise ValueError(
                    f"image {name!r} would be written to {folder}/{base}{extension}, a "
                    f"folder of the files of image {other!r}; rename one of them in the "
                    "image list."
                )
    return bases


def array_to_datum(array):
    """Numpy array -> DatumProto (uint32 list for unsigned ints, float list otherwise)."""
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


def write_datum(path, array):
    """Writes a `.delg_global` (or any DatumProto) file."""
    write_bytes_atomic(path, with_checksum(array_to_datum(array).SerializeToString()), parents=True)


def read_datum(path):
    """Reads a DatumProto file into a numpy array (checksum verified if it has one)."""
    datum = datum_pb2.DatumProto()
    body = verified_body(path, "DatumProto")
    try:
        datum.ParseFromString(body)
        return datum_to_array(datum)
    except Exception as e:  # protobuf raises DecodeError (a Message.Error)
        raise _corrupted(
            path,
            "DatumProto",
            f"it does not parse: {e}; expected a file written "
            "by datum_io.WriteToFile / delf_io.write_datum",
        ) from e


def arrays_to_delf_features(locations, scales, descriptors, attention, orientations=None):
    """Numpy arrays -> DelfFeatures proto (official field usage)."""
    locations = np.asarray(locations, np.float32).reshape(-1, 2)
    num = locations.shape[0]
    scales = np.asarray(scales, np.float32).reshape(-1)
    attention = np.asarray(attention, np.float32).reshape(-1)
    descriptors = np.asarray(descriptors)
    if orientations is None:
        orientations = np.zeros([num], np.float32)
    sizes = {
        "scales": scales.shape[0],
        "descriptors": descriptors.shape[0] if num else 0,
        "attention": attention.shape[0],
        "orientations": len(orientations),
    }
    wrong = {k: v for k, v in sizes.items() if v != num}
    if wrong:
        raise ValueError(
            f"DelfFeatures arrays must all have {num} rows (locations), received {wrong}."
        )
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
    orientations).
    """
    num = len(features.feature)
    if num == 0:
        return (
            np.zeros([0, 2], np.float32),
            np.zeros([0], np.float32),
            np.zeros([0, 0], np.float32),
            np.zeros([0], np.float32),
            np.zeros([0], np.float32),
        )
    locations = np.array([[f.y, f.x] for f in features.feature], np.float32)
    scales = np.array([f.scale for f in features.feature], np.float32)
    attention = np.array([f.strength for f in features.feature], np.float32)
    orientations = np.array([f.orientation for f in features.feature], np.float32)
    descriptors = np.stack([datum_to_array(f.descriptor) for f in features.feature])
    return locations, scales, descriptors, attention, orientations


def write_delf(path, locations, scales, descriptors, attention, orientations=None):
    """Writes a `.delf` file (official `feature_io.WriteToFile` format)."""
    features = arrays_to_delf_features(locations, scales, descriptors, attention, orientations)
    write_bytes_atomic(path, with_checksum(features.SerializeToString()), parents=True)


def read_delf(path):
    """Reads a `.delf` file: (locations, scales, descriptors, attention, orientations);
    its checksum verified if it has one.
    """
    features = feature_pb2.DelfFeatures()
    body = verified_body(path, "DelfFeatures (.delf)")
    try:
        features.ParseFromString(body)
        return delf_features_to_arrays(features)
    except Exception as e:
        raise _corrupted(
            path,
            "DelfFeatures (.delf)",
            f"it does not parse: {e}; expected a "
            ".delf file written by feature_io.WriteToFile or "
            "delf_io.write_delf",
        ) from e
