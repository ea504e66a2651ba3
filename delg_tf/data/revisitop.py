"""Revisited Oxford / Paris dataset reader (Radenović et al., CVPR 2018).

Reads the ground truth ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (or the
``.mat`` variant) and locates images in the ``jpg/`` folder next to it:

    <data_dir>/gnd_roxford5k.pkl
    <data_dir>/jpg/<name>.jpg

Ground-truth pickles are untrusted input: :func:`load_pickle_restricted` only
accepts plain containers, numpy arrays and numpy scalars, and refuses every
other global (e.g. ``os.system``) before anything is called.

As the protocol requires, query images are cropped to their bounding box
``bbx = (x1, y1, x2, y2)`` (pixels, PIL ``crop`` convention) before extraction.

numpy/scipy only; Pillow is imported lazily by the image loaders.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_EXTENSION = ".jpg"
IMAGE_SUBDIR = "jpg"
GND_LIST_KEYS = ("easy", "hard", "junk")
BBX_LENGTH = 4
KNOWN_DATASETS = ("roxford5k", "rparis6k")

# (module, name) pairs a revisitop ground-truth pickle may reference. Anything
# else is refused. numpy 1.x pickles say ``numpy.core``, numpy 2.x ``numpy._core``.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    *(
        (m, n)
        for m in ("builtins", "__builtin__")
        for n in ("set", "frozenset", "bytes", "bytearray", "complex")
    ),
    ("collections", "OrderedDict"),
}
# Protocol-2 pickles written by Python 3 encode bytes via _codecs.encode(str, 'latin1').
_SAFE_ENCODINGS = ("latin1", "latin-1", "iso-8859-1")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class GndFormatError(ValueError):
    """A ground-truth file does not have the revisitop structure."""


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    if encoding.lower() not in _SAFE_ENCODINGS:
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, encoding, errors)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only resolves an allow-list of globals."""

    def __init__(self, file, source_name: str):
        super().__init__(file, encoding="latin1")
        self._source_name = source_name

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _safe_codecs_encode
        if (module, name) in _ALLOWED_GLOBALS:
            module = module.replace("numpy.core.", "numpy._core.")
            module = {"__builtin__": "builtins"}.get(module, module)
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source_name}: refusing to load global '{module}.{name}'. "
            "Ground-truth pickles may only contain plain containers (dict, list, "
            "tuple, str, numbers) and numpy arrays. If this file is the official "
            "revisitop gnd file it may be corrupted or tampered with: download it "
            "again, or use the .mat variant."
        )


def load_pickle_restricted(path) -> object:
    """Loads an untrusted pickle allowing only containers and numpy arrays.

    Args:
        path: path of the pickle file.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: if the pickle references any other global (nothing
            from the pickle is executed in that case).
        FileNotFoundError: if the file is missing.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated/corrupted files raise many types.
        raise GndFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {e}).") from e


def _as_index_array(value, where: str, num_db: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # pragma: no cover - defensive.
        raise GndFormatError(
            f"{where}: expected a list of image indices, got {type(value).__name__}"
        ) from e
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise GndFormatError(f"{where}: expected integer image indices, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64).ravel()
    if arr.min() < 0 or arr.max() >= num_db:
        raise GndFormatError(
            f"{where}: indices must be in [0, {num_db}) (0-based into imlist), got "
            f"range [{arr.min()}, {arr.max()}]."
        )
    return arr


def validate_gnd(cfg, source: str = "<gnd>", require_bbx: bool = True) -> dict:
    """Checks and normalises a revisitop ground-truth dict.

    Args:
        cfg: the loaded object; expected ``{'imlist': [str], 'qimlist': [str],
            'gnd': [{'easy': idx, 'hard': idx, 'junk': idx, 'bbx': 4 floats}]}``
            with ``len(gnd) == len(qimlist)`` and 0-based indices into imlist.
        source: file name used in error messages.
        require_bbx: whether every query must have a ``bbx``.

    Returns:
        A new dict with the same keys; index lists as int64 arrays and ``bbx``
        as float64 arrays [4] (or None when absent and not required).

    Raises:
        GndFormatError: describing the first structural problem found.
    """
    if not isinstance(cfg, dict):
        raise GndFormatError(
            f"{source}: expected a dict with keys imlist, qimlist, gnd; got {type(cfg).__name__}."
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise GndFormatError(
            f"{source}: missing key(s) {missing}; found {sorted(map(str, cfg))}. "
            "Expected the revisitop gnd_<dataset>.pkl layout."
        )
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    for key, lst in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(lst, (list, tuple, np.ndarray)) or not all(
            isinstance(x, str) for x in lst
        ):
            raise GndFormatError(f"{source}: '{key}' must be a list of image names (str).")
    if not isinstance(gnd, (list, tuple)):
        raise GndFormatError(
            f"{source}: 'gnd' must be a list of per-query dicts, got {type(gnd).__name__}."
        )
    if len(gnd) != len(qimlist):
        raise GndFormatError(
            f"{source}: 'gnd' has {len(gnd)} entries but 'qimlist' has "
            f"{len(qimlist)}; they must be equal (one per query)."
        )
    num_db = len(imlist)
    out_gnd = []
    for q, entry in enumerate(gnd):
        where = f"{source}: gnd[{q}]"
        if not isinstance(entry, dict):
            raise GndFormatError(f"{where} must be a dict, got {type(entry).__name__}.")
        lacking = [k for k in GND_LIST_KEYS if k not in entry]
        if lacking:
            raise GndFormatError(
                f"{where} lacks key(s) {lacking}; revisitop entries have "
                f"{list(GND_LIST_KEYS)} and 'bbx'."
            )
        new = {k: _as_index_array(entry[k], f"{where}['{k}']", num_db) for k in GND_LIST_KEYS}
        bbx = entry.get("bbx")
        if bbx is None:
            if require_bbx:
                raise GndFormatError(
                    f"{where} lacks 'bbx' (x1, y1, x2, y2) needed to crop the query."
                )
        else:
            bbx = np.asarray(bbx, dtype=np.float64).ravel()
            if bbx.shape != (BBX_LENGTH,) or not (bbx[2] > bbx[0] and bbx[3] > bbx[1]):
                raise GndFormatError(
                    f"{where}['bbx'] must be 4 numbers (x1, y1, x2, y2) with "
                    f"x2 > x1 and y2 > y1, got {bbx.tolist()}."
                )
        new["bbx"] = bbx
        out_gnd.append(new)
    return {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": out_gnd}


def _mat_strings(cell) -> list:
    return [
        str("".join(item)) if not isinstance(item, str) else item
        for entry in np.squeeze(cell)
        for item in np.atleast_1d(entry)
    ]


def load_gnd_mat(path) -> dict:
    """Reads a revisitop ``gnd_<dataset>.mat`` into the pickle layout.

    MATLAB indices are 1-based; they are converted to 0-based.

    Args:
        path: path of the .mat file.

    Returns:
        dict with imlist, qimlist, gnd (not yet validated).
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as e:
        raise GndFormatError(f"{path}: not a readable .mat file ({type(e).__name__}: {e}).") from e
    for key in ("imlist", "qimlist", "gnd"):
        if key not in mat:
            raise GndFormatError(f"{path}: missing variable '{key}' (expected revisitop gnd .mat).")
    gnd = []
    for entry in np.atleast_1d(np.squeeze(mat["gnd"])):
        new = {}
        for key in GND_LIST_KEYS:
            if key in entry.dtype.names:
                new[key] = np.asarray(entry[key], dtype=np.int64).ravel() - 1
        if "bbx" in entry.dtype.names:
            new["bbx"] = np.asarray(entry["bbx"], dtype=np.float64).ravel()
        gnd.append(new)
    return {
        "imlist": _mat_strings(mat["imlist"]),
        "qimlist": _mat_strings(mat["qimlist"]),
        "gnd": gnd,
    }


def load_gnd(path, require_bbx: bool = True) -> dict:
    """Loads and validates a revisitop ground-truth file (.pkl or .mat).

    Args:
        path: ``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl`` or a ``.mat`` variant.
        require_bbx: whether every query must have a bounding box.

    Returns:
        Validated dict (see :func:`validate_gnd`).

    Raises:
        FileNotFoundError, UnsafePickleError, GndFormatError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ground-truth file not found: {path} (expected gnd_roxford5k.pkl, "
            "gnd_rparis6k.pkl or their .mat variants)."
        )
    if path.suffix.lower() == ".mat":
        raw = load_gnd_mat(path)
    else:
        raw = load_pickle_restricted(path)
    return validate_gnd(raw, str(path), require_bbx=require_bbx)


def read_distractor_list(path) -> list:
    """Reads the +1M distractor image list (one relative path per line).

    Args:
        path: text file, e.g. revisitop's ``revisitop1m.txt``.

    Returns:
        list of non-empty stripped lines.
    """
    with open(path, "r", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def crop_to_bbx(image, bbx):
    """Crops a PIL image to a revisitop bounding box.

    Args:
        image: PIL.Image.
        bbx: (x1, y1, x2, y2) in pixels (floats allowed; PIL rounds).

    Returns:
        The cropped PIL image.
    """
    x1, y1, x2, y2 = (float(v) for v in bbx)
    return image.crop((int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))))


@dataclasses.dataclass
class RevisitopDataset:
    """A Revisited Oxford/Paris dataset on disk.

    Attributes:
        name: dataset name (``roxford5k`` or ``rparis6k``; informative only).
        gnd_path: path of the ground-truth file.
        images_dir: folder containing ``<name>.jpg`` files.
        imlist: database image names (no extension), length num_db.
        qimlist: query image names, length num_queries.
        gnd: per-query dicts with easy/hard/junk (int64, 0-based) and bbx.
        distractors: optional +1M distractor names appended after imlist.
    """

    name: str
    gnd_path: Path
    images_dir: Path
    imlist: list
    qimlist: list
    gnd: list
    distractors: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_dir(
        cls,
        data_dir,
        name: Optional[str] = None,
        gnd_path=None,
        images_dir=None,
        distractor_list=None,
    ) -> "RevisitopDataset":
        """Opens ``<data_dir>/gnd_<name>.pkl`` (or .mat) and ``<data_dir>/jpg``.

        Args:
            data_dir: dataset folder.
            name: dataset name; guessed from the gnd file name when omitted.
            gnd_path: explicit ground-truth path (overrides the guess).
            images_dir: explicit image folder (default ``<data_dir>/jpg``).
            distractor_list: optional +1M distractor list file.

        Returns:
            RevisitopDataset.
        """
        data_dir = Path(data_dir)
        if gnd_path is None:
            candidates = []
            names = [name] if name else list(KNOWN_DATASETS)
            for n in names:
                candidates += [data_dir / f"gnd_{n}.pkl", data_dir / f"gnd_{n}.mat"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"no ground-truth file in {data_dir}; looked for "
                    f"{[c.name for c in candidates]}. Pass gnd_path explicitly."
                )
            gnd_path = found[0]
        gnd_path = Path(gnd_path)
        if name is None:
            name = gnd_path.stem.replace("gnd_", "")
        cfg = load_gnd(gnd_path)
        distractors = read_distractor_list(distractor_list) if distractor_list else []
        return cls(
            name=name,
            gnd_path=gnd_path,
            images_dir=Path(images_dir) if images_dir else data_dir / IMAGE_SUBDIR,
            imlist=cfg["imlist"],
            qimlist=cfg["qimlist"],
            gnd=cfg["gnd"],
            distractors=distractors,
        )

    @property
    def num_db(self) -> int:
        """Database size including distractors."""
        return len(self.imlist) + len(self.distractors)

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    def image_path(self, i: int) -> Path:
        """Path of database image ``i`` (distractors come after imlist)."""
        if i < len(self.imlist):
            return self.images_dir / (self.imlist[i] + IMAGE_EXTENSION)
        rel = self.distractors[i - len(self.imlist)]
        return self.images_dir / (
            rel if rel.lower().endswith(IMAGE_EXTENSION) else rel + IMAGE_EXTENSION
        )

    def query_path(self, q: int) -> Path:
        return self.images_dir / (self.qimlist[q] + IMAGE_EXTENSION)

    def load_query(self, q: int, crop: bool = True):
        """Loads query ``q`` as an RGB PIL image, cropped to its bbx by default."""
        from PIL import Image

        with Image.open(self.query_path(q)) as im:
            im = im.convert("RGB")
        bbx = self.gnd[q].get("bbx")
        if crop and bbx is not None:
            im = crop_to_bbx(im, bbx)
        return im

    def load_image(self, i: int):
        """Loads database image ``i`` as an RGB PIL image."""
        from PIL import Image

        with Image.open(self.image_path(i)) as im:
            return im.convert("RGB")

    def missing_images(self) -> list:
        """Paths of database/query images that do not exist (for a clear error)."""
        paths = [self.image_path(i) for i in range(self.num_db)]
        paths += [self.query_path(q) for q in range(self.num_queries)]
        return [p for p in paths if not p.is_file()]
