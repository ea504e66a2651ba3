"""A global-descriptor index on disk: faiss built from feature stores, saved, loaded, searched.

The database side of +1M-image retrieval: the global descriptors of a feature store
(`delg_tf.extraction.store.FeatureStore`: one `.h5` file, a parts directory, or the shard
files of `extract --num_shards`, a list or a glob) go into a faiss inner-product index,
built once, written to a folder and loaded by every evaluation / query session instead of
being rebuilt from the descriptors each time.

Methods (DELG global descriptors are L2-normalised, Cao et al. ECCV 2020 Sec. 4.1, so
inner product = cosine similarity; rows are normalised again when added, queries when
searched, zero rows stay zero):

    flat      IndexFlatIP: exact, the reference (4 * dim bytes per image).
    ivf_flat  IndexIVFFlat: `nlist` k-means cells, `nprobe` of them scanned per query
              (exact scores of the scanned vectors; 4 * dim bytes per image).
    ivf_pq    IndexIVFPQ: same cells, vectors stored as `pq_m` codes of `pq_nbits` bits
              (`pq_m * pq_nbits / 8` bytes per image; approximate scores).
    hnsw      IndexHNSWFlat: graph of degree `hnsw_m` (2x at level 0), built with
              `ef_construction`, searched with `ef_search` candidates (4 * dim bytes +
              the graph per image).

Defaults are chosen for ~1M descriptors: `nlist` = 4 sqrt(N) (capped so that every cell
has `MIN_TRAIN_POINTS_PER_LIST` training points), `nprobe` 32, `pq_m` = 64 codes (fewer
for small dimensions: the largest divisor of dim <= dim / 4), `hnsw_m` 32,
`ef_construction` 80, `ef_search` 128. IVF quantizers and PQ codebooks are trained on a
seeded random sample of `train_size` rows (default `TRAIN_POINTS_PER_LIST` per cell, at
least `PQ_TRAIN_POINTS_PER_CODE` per PQ centroid, at most N); vectors are then read from
the store and added `chunk_size` rows at a time, so memory is the index, the training
sample and one chunk, never the whole descriptor matrix.

Folder layout (`StoreIndex.save` with `delg_tf.atomic.staged_directory`: a temporary
sibling folder, fsynced, then renamed into place, so a crash never leaves a half-written
index under the final name):

    index.faiss     faiss.write_index of the index
    names.json      image names in index-id order (a JSON list)
    manifest.json   format_version, method, params (resolved), metric, normalized, dim,
                    count, train_size, faiss_version, build_seconds, store (as named),
                    sources [{path, size, mtime_ns}] (the store files) and
                    files {name: size in bytes}

`load_index` refuses (one `IndexLoadError` line naming the folder or file and the fix) a
folder without a manifest, of another format version, with a missing or resized file, a
faiss index or names list that does not match the manifest's dim/count, an unexpected
dimension, and (by default) source stores that changed since the build.

`StoreIndex.search(queries, k) -> (ids, scores)` has the contract of
`delg_tf.retrieval.search.GlobalIndex.search` (ids are positions in `names`, -1 padding);
`StoreIndex.aligned(db_names)` returns a view whose ids are positions in a dataset's
database list (revisitop names, resolved like `FeatureStore.resolve`), for evaluation.

numpy + h5py (through the store); faiss imported lazily.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from delg_tf import atomic
from delg_tf.configs import ConfigError, expect, expect_choice, expect_int, is_int
from delg_tf.progress import progress_bar
from delg_tf.retrieval.search import DEFAULT_TOP_K, SearchError

METHODS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
IVF_METHODS = ("ivf_flat", "ivf_pq")
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
NAMES_FILE = "names.json"
MANIFEST_FILE = "manifest.json"
METRIC = "inner_product"
FAISS_LOADER_LOGGER = "faiss.loader"

DEFAULT_METHOD = "flat"
NLIST_PER_SQRT_N = 4  # faiss guidance: nlist between 4 sqrt(N) and 16 sqrt(N).
MIN_TRAIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid.
TRAIN_POINTS_PER_LIST = 50
PQ_TRAIN_POINTS_PER_CODE = 64  # training points per PQ centroid (2**nbits of them).
DEFAULT_NPROBE = 32
DEFAULT_PQ_CODES = 64  # pq_m at dim >= 256: 64 bytes per image with 8-bit codes.
MIN_PQ_SUBVECTOR_DIM = 4
DEFAULT_PQ_NBITS = 8
MAX_PQ_NBITS = 16
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 128
DEFAULT_CHUNK_SIZE = 16384  # rows per store read / faiss add (128 MiB at dim 2048).
NORM_EPS = 1e-12
# errno values meaning "this folder cannot take the index" (reported as one line): those
# of every output folder, and a missing parent.
OUTPUT_ERRNOS = atomic.OUTPUT_FOLDER_ERRNOS | {errno.ENOENT}
BUILD_HINT = "python -m delg_tf.index --features=STORE --index_dir=DIR"


class IndexLoadError(ValueError):
    """An index folder is missing, incomplete, stale or does not fit the queries."""


class IndexOutputError(OSError):
    """The index folder cannot be written (permissions, a file in the way, disk full)."""


class IndexExistsError(FileExistsError):
    """The index folder exists and overwriting was not asked for."""


class FaissMissingError(ImportError):
    """faiss is not installed."""


def quiet_faiss_loader():
    """Entry modules: faiss logs which CPU build it loads at INFO on import, which absl's
    handler would print on every run; keep its loader at WARNING.
    """
    logging.getLogger(FAISS_LOADER_LOGGER).setLevel(logging.WARNING)


def import_faiss():
    """The faiss module, or FaissMissingError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise FaissMissingError(
            "faiss is not installed: install the optional extra with `pip install "
            "'delg_tf[faiss]'` (faiss-cpu)."
        ) from e
    return faiss


@dataclasses.dataclass(frozen=True)
class IndexParams:
    """Validated parameters of an index.

    Each attribute is the flag of the same name of `python -m delg_tf.index` (this
    section is their help). Unset (None) values are chosen from the number of
    descriptors N and their dimension (`resolve`); the parameters of other methods are
    ignored (and not stored in the manifest).

    Attributes:
      method: faiss index: flat (exact), ivf_flat, ivf_pq or hnsw.
      nlist: IVF cells of ivf_flat / ivf_pq (default 4 sqrt(N)).
      nprobe: IVF cells scanned per query (a search parameter, stored as the default).
      pq_m: PQ codes per vector of ivf_pq, a divisor of the dimension (default 64, fewer
        for dimensions below 256).
      pq_nbits: Bits per PQ code of ivf_pq.
      hnsw_m: HNSW graph degree.
      ef_construction: HNSW candidates while building.
      ef_search: HNSW candidates per query (a search parameter; >= k is useful).
      train_size: IVF training sample (default 50 per cell, at least 64 per PQ centroid,
        at most N).
      chunk_size: Rows read from the store and added to the index per step.
      seed: Seed of the training sample and of the faiss k-means.
    """

    method: str = DEFAULT_METHOD
    nlist: Optional[int] = None
    nprobe: int = DEFAULT_NPROBE
    pq_m: Optional[int] = None
    pq_nbits: int = DEFAULT_PQ_NBITS
    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = DEFAULT_EF_SEARCH
    train_size: Optional[int] = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seed: int = 0

    def __post_init__(self):
        expect_choice("method", self.method, METHODS)
        for name in ("nlist", "pq_m", "train_size"):
            if getattr(self, name) is not None:
                expect_int(
                    name, getattr(self, name), 1, fix="or leave it unset (chosen from the data)"
                )
        for name, minimum in (
            ("nprobe", 1),
            ("hnsw_m", 2),
            ("ef_construction", 1),
            ("ef_search", 1),
            ("chunk_size", 1),
            ("seed", 0),
        ):
            expect_int(name, getattr(self, name), minimum)
        expect(
            is_int(self.pq_nbits) and 1 <= self.pq_nbits <= MAX_PQ_NBITS,
            "pq_nbits",
            f"an integer in [1, {MAX_PQ_NBITS}]",
            self.pq_nbits,
        )

    def resolve(self, num, dim):
        """The concrete parameters of `method` for N = `num` descriptors of size `dim`.

        Returns:
          dict of the method's parameters (what the manifest stores), with
          "train_size" for the IVF methods.

        Raises:
          ConfigError: parameters that cannot work for this N / dim.
        """
        if self.method == "flat":
            return {}
        if self.method == "hnsw":
            return {
                "hnsw_m": int(self.hnsw_m),
                "ef_construction": int(self.ef_construction),
                "ef_search": int(self.ef_search),
            }
        nlist = int(self.nlist) if self.nlist is not None else default_nlist(num)
        if nlist > num:
            raise ConfigError(
                f"--nlist={nlist} cells for {num} descriptors; use at most "
                f"{max(1, num // MIN_TRAIN_POINTS_PER_LIST)} (or leave it "
                "unset).",
                "nlist",
            )
        out = {"nlist": nlist, "nprobe": int(min(self.nprobe, nlist))}
        if self.method == "ivf_pq":
            pq_m = int(self.pq_m) if self.pq_m is not None else default_pq_m(dim)
            if dim % pq_m:
                raise ConfigError(
                    f"--pq_m={pq_m} does not divide the descriptor dimension "
                    f"{dim}; pass a divisor of {dim} (or leave it unset).",
                    "pq_m",
                )
            out.update(pq_m=pq_m, pq_nbits=int(self.pq_nbits))
        train_size = (
            int(self.train_size)
            if self.train_size is not None
            else default_train_size(num, nlist, out.get("pq_nbits"))
        )
        train_size = min(train_size, num)
        needed = max(nlist, 2 ** out["pq_nbits"] if "pq_nbits" in out else 0)
        if train_size < needed:
            what = f"{nlist} cells" if needed == nlist else f"2**pq_nbits = {needed} PQ centroids"
            raise ConfigError(
                f"--train_size={train_size} training descriptors (N = {num}) for {what}; "
                f"faiss needs at least {needed}: raise --train_size, or lower --nlist / "
                "--pq_nbits.",
                "train_size",
            )
        out["train_size"] = train_size
        return out


def default_nlist(num):
    """4 sqrt(N) IVF cells, at most one per `MIN_TRAIN_POINTS_PER_LIST` descriptors."""
    nlist = int(round(NLIST_PER_SQRT_N * math.sqrt(num)))
    return max(1, min(nlist, num // MIN_TRAIN_POINTS_PER_LIST))


def default_pq_m(dim):
    """`DEFAULT_PQ_CODES` codes, or fewer: the largest divisor of dim that leaves
    sub-vectors of at least `MIN_PQ_SUBVECTOR_DIM` components.
    """
    limit = max(1, min(DEFAULT_PQ_CODES, dim // MIN_PQ_SUBVECTOR_DIM))
    return next(m for m in range(limit, 0, -1) if dim % m == 0)


def default_train_size(num, nlist, pq_nbits=None):
    """`TRAIN_POINTS_PER_LIST` per cell and `PQ_TRAIN_POINTS_PER_CODE` per PQ centroid,
    at most N.
    """
    size = TRAIN_POINTS_PER_LIST * nlist
    if pq_nbits is not None:
        size = max(size, PQ_TRAIN_POINTS_PER_CODE * 2**pq_nbits)
    return min(num, size)


def normalize_rows(x):
    """L2-normalises the rows of float32 `x` in place (zero rows stay zero); returns it."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, NORM_EPS)
    return x


def _new_faiss_index(faiss, method, dim, params, seed):
    metric = faiss.METRIC_INNER_PRODUCT
    if method == "flat":
        return faiss.IndexFlatIP(dim)
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if method == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], metric)
    else:
        index = faiss.IndexIVFPQ(
            quantizer, dim, params["nlist"], params["pq_m"], params["pq_nbits"], metric
        )
        index.pq.cp.seed = seed
    index.cp.seed = seed
    index.nprobe = params["nprobe"]
    return index


def _set_search_params(index, method, nprobe=None, ef_search=None):
    faiss = import_faiss()
    if nprobe is not None and method in IVF_METHODS:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    if ef_search is not None and method == "hnsw":
        index.hnsw.efSearch = int(ef_search)


def _chunks(num, chunk_size):
    return [(start, min(start + chunk_size, num)) for start in range(0, num, chunk_size)]


def _source_entries(files):
    out = []
    for path in files:
        stat = os.stat(path)
        out.append(
            {
                "path": str(Path(path).resolve()),
                "size": int(stat.st_size),
                "mtime_ns": int(stat.st_mtime_ns),
            }
        )
    return out


def _open_store(features):
    from delg_tf.extraction.store import FeatureStore

    if isinstance(features, FeatureStore):
        return features, False
    return FeatureStore(features), True


def build(features, params: Optional[IndexParams] = None, progress=True) -> "StoreIndex":
    """Builds the index of the global descriptors of a feature store, in memory.

    Args:
      features: a store source (`.h5` file, parts directory, list or glob of shard files;
        see `FeatureStore`) or an open `FeatureStore`.
      params: `IndexParams` (default: exact `flat`).
      progress: progress bars (training sample, added chunks).

    Returns:
      A `StoreIndex` (ids = positions in the store's `names`); `save` writes it.

    Raises:
      StoreError: the store is missing or inconsistent, or has no global descriptors.
      ConfigError: parameters that do not fit the store (N, dim).
      FaissMissingError: faiss is not installed.
    """
    from delg_tf.extraction.store import StoreError

    params = params or IndexParams()
    faiss = import_faiss()
    store, owned = _open_store(features)
    try:
        num, dim = len(store), int(store.global_dim)
        if not num or not dim:
            raise StoreError(
                f"feature store {store.description} has "
                f"{'no images' if not num else 'no global descriptors'}; index a store "
                "extracted with global features (a local_and_global or global export)."
            )
        resolved = params.resolve(num, dim)
        started = time.perf_counter()
        index = _new_faiss_index(faiss, params.method, dim, resolved, params.seed)
        train_size = resolved.pop("train_size", 0)
        if train_size:
            rng = np.random.default_rng(params.seed)
            rows = np.sort(rng.choice(num, size=train_size, replace=False))
            sample = np.empty((train_size, dim), np.float32)
            pieces = progress_bar(
                _chunks(train_size, params.chunk_size),
                "index: train sample",
                "chunk",
                enabled=progress,
            )
            for start, end in pieces:
                sample[start:end] = store.global_rows(rows[start:end])
            index.train(normalize_rows(sample))
            del sample
        for start, end in progress_bar(
            _chunks(num, params.chunk_size), "index: add", "chunk", enabled=progress
        ):
            index.add(normalize_rows(store.global_rows(np.arange(start, end))))
        manifest = {
            "format_version": FORMAT_VERSION,
            "method": params.method,
            "params": resolved,
            "metric": METRIC,
            "normalized": True,
            "dim": dim,
            "count": num,
            "train_size": int(train_size),
            "seed": int(params.seed),
            "chunk_size": int(params.chunk_size),
            "faiss_version": faiss.__version__,
            "build_seconds": round(time.perf_counter() - started, 3),
            "store": store.description,
            "sources": _source_entries(store.files),
        }
        return StoreIndex(index, list(store.names), manifest)
    finally:
        if owned:
            store.close()


def build_index(
    features, index_dir, params: Optional[IndexParams] = None, overwrite=False, progress=True
) -> Path:
    """Builds the index of a feature store and writes it to `index_dir` (atomic).

    Args:
      features: store source (see `build`).
      index_dir: output folder (see the module docstring for its files).
      params: `IndexParams`.
      overwrite: replace an existing index folder.
      progress: progress bars.

    Returns:
      Path of the index folder.

    Raises:
      IndexExistsError: `index_dir` exists and `overwrite` is False (checked before
        building), or is a non-empty folder that is not an index.
      IndexOutputError: the folder cannot be written.
      plus the errors of `build`.
    """
    check_output(index_dir, overwrite, probe=True)
    return build(features, params, progress).save(index_dir, overwrite=overwrite)


def check_output(index_dir, overwrite, probe=False):
    """Raises IndexExistsError if writing `index_dir` is not allowed (see `build_index`);
    with `probe`, also IndexOutputError if its parent cannot take a folder (checked by
    creating and removing the temporary folder, before a long build).
    """
    index_dir = Path(index_dir)
    if probe:
        tmp = atomic.temporary_path(index_dir)
        try:
            index_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            tmp.rmdir()
        except OSError as e:
            if e.errno not in OUTPUT_ERRNOS:
                raise
            raise _output_error(e, index_dir) from e
    if not index_dir.exists() and not index_dir.is_symlink():
        return
    if not index_dir.is_dir():
        raise IndexExistsError(
            f"--index_dir {index_dir} is a file; pass a folder path (the "
            "index is written as a folder)."
        )
    if not overwrite:
        raise IndexExistsError(
            f"--index_dir {index_dir} already exists; pass --overwrite to "
            "replace it, or choose another folder."
        )
    if any(index_dir.iterdir()) and not (index_dir / MANIFEST_FILE).is_file():
        raise IndexExistsError(
            f"--index_dir {index_dir} is a non-empty folder without "
            f"{MANIFEST_FILE} (not an index); refusing to replace it even "
            "with --overwrite: choose another folder."
        )


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _output_error(error, index_dir):
    return IndexOutputError(
        f"cannot write --index_dir {index_dir} ({os.strerror(error.errno)}); pass a folder "
        "you can write to (not under a file) on a disk with free space, then rerun."
    )


class StoreIndex:
    """A faiss index of a feature store's global descriptors, with the image names.

    Built by `build`, written by `save`, read by `load_index`. `search` follows
    `delg_tf.retrieval.search.GlobalIndex.search`.

    Attributes:
      index: the faiss index (inner product over L2-normalised rows).
      names: image names; id i is `names[i]`.
      manifest: dict (see the module docstring).
      index_dir: the folder it was loaded from / saved to, or None.
    """

    def __init__(self, index, names, manifest, index_dir=None):
        self.index = index
        self.names = list(names)
        self.manifest = dict(manifest)
        self.index_dir = Path(index_dir) if index_dir is not None else None

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def size(self) -> int:
        """Number of indexed descriptors."""
        return len(self.names)

    def _where(self):
        return f"index {self.index_dir}" if self.index_dir is not None else "the index"

    def set_search_params(self, nprobe=None, ef_search=None):
        """Changes the search-time parameters (IVF `nprobe`, HNSW `ef_search`); others
        ignore them. Returns self.
        """
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None:
                expect_int(name, value, 1)
        _set_search_params(self.index, self.method, nprobe, ef_search)
        params = dict(self.manifest.get("params", {}))
        if "nprobe" in params:
            params["nprobe"] = int(import_faiss().extract_index_ivf(self.index).nprobe)
        if "ef_search" in params:
            params["ef_search"] = int(self.index.hnsw.efSearch)
        self.manifest["params"] = params
        return self

    def search(self, queries: np.ndarray, k: int = DEFAULT_TOP_K) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k ids and inner-product scores of L2-normalised queries.

        Args:
          queries: float [Q, D] (or [D]).
          k: results per query (clipped to the index size).

        Returns:
          (ids int64 [Q, k'], scores float32 [Q, k']) best first, ties by increasing id;
          k' = min(k, size). Approximate methods may return fewer than k' results:
          missing ids are -1 (last, with the lowest float32 score).
        """
        queries = np.array(queries, dtype=np.float32, ndmin=2)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(
                f"queries of shape {queries.shape} for {self._where()} of "
                f"dimension {self.dim}; pass [num_queries, {self.dim}] "
                "descriptors of the model that extracted the indexed store."
            )
        if isinstance(k, bool) or int(k) < 1:
            raise SearchError(f"k must be >= 1, got {k}.")
        k = min(int(k), self.size)
        scores, ids = self.index.search(np.ascontiguousarray(normalize_rows(queries)), k)
        ids = ids.astype(np.int64)
        scores = scores.astype(np.float32)
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def search_names(self, queries, k=DEFAULT_TOP_K):
        """`search` with names: (list per query of the result names, scores [Q, k'])."""
        ids, scores = self.search(queries, k)
        return [[self.names[i] for i in row if i >= 0] for row in ids], scores

    def aligned(
        self, db_names: Sequence[str], what="the database list", missing: Sequence[str] = ()
    ) -> "AlignedIndex":
        """A view searching with ids = positions in `db_names` (see `AlignedIndex`)."""
        return AlignedIndex(self, db_names, what, missing)

    def save(self, index_dir, overwrite=False) -> Path:
        """Writes the index folder with `delg_tf.atomic.staged_directory`: the files go
        to a temporary sibling folder (each fsynced), which is then renamed into place.

        With `overwrite`, an existing index is moved aside, the new one renamed into
        place, then the old one deleted: `index_dir` is always a complete index (old or
        new), never a half-written one. A killed build can leave a hidden
        `.NAME.tmp-XXXXXXXX` sibling (as large as the index), safe to delete.

        Returns:
          Path of the folder.
        """
        faiss = import_faiss()
        index_dir = Path(index_dir)
        check_output(index_dir, overwrite)
        manifest = dict(self.manifest)
        try:
            with atomic.staged_directory(index_dir) as tmp:
                tmp.mkdir()
                try:
                    faiss.write_index(self.index, str(tmp / INDEX_FILE))
                except RuntimeError as e:  # faiss reports I/O failures (disk full) so.
                    message = str(e).strip().splitlines()
                    raise IndexOutputError(
                        f"cannot write the index to --index_dir {index_dir} (faiss: "
                        f"{message[-1] if message else type(e).__name__}); pass a folder "
                        "you can write to on a disk with free space, then rerun."
                    ) from e
                _fsync_file(tmp / INDEX_FILE)
                atomic.write_json_atomic(self.names, tmp / NAMES_FILE, ensure_ascii=False)
                manifest["files"] = {
                    name: (tmp / name).stat().st_size for name in (INDEX_FILE, NAMES_FILE)
                }
                atomic.write_json_atomic(manifest, tmp / MANIFEST_FILE, ensure_ascii=False)
        except IndexOutputError:
            raise
        except OSError as e:
            if e.errno in OUTPUT_ERRNOS and not isinstance(e, FileExistsError):
                raise _output_error(e, index_dir) from e
            raise
        self.manifest = manifest
        self.index_dir = index_dir
        return index_dir


class AlignedIndex:
    """A `StoreIndex` searched with ids = positions in a dataset's database list.

    Evaluation numbers database images by their position in the dataset list (revisitop
    `imlist`, then the +1M distractors), not by their position in the store. Each name
    is resolved like `FeatureStore.resolve` (the name, then with `.jpg` / `.png` ...
    suffixes, also under a `jpg/` prefix). Indexed images that are not in the list (e.g.
    queries extracted into the same store) are dropped from the results: the index is
    asked for k + (number of such images) results, so the list should be most of the
    index (index the database's own store otherwise).

    Args:
      index: a `StoreIndex`.
      db_names: database image names in dataset order.
      what: how the list is named in messages.
      missing: names of `db_names` known to have no features (failed extractions):
        they may be absent from the index and are then never retrieved.

    Raises:
      IndexLoadError: a name (not in `missing`) is not in the index, or two names
        resolve to one image.
    """

    def __init__(
        self,
        index: StoreIndex,
        db_names: Sequence[str],
        what="the database list",
        missing: Sequence[str] = (),
    ):
        from delg_tf.extraction.store import IMAGE_NAME_SUFFIXES, IMAGE_PREFIX

        self.base = index
        position = {name: i for i, name in enumerate(index.names)}

        def resolve(name):
            for suffix in IMAGE_NAME_SUFFIXES:
                for candidate in (name + suffix, f"{IMAGE_PREFIX}{name}{suffix}"):
                    if candidate in position:
                        return position[candidate]
            return None

        ids = [resolve(name) for name in db_names]
        known_missing = set(missing)
        absent = [n for n, i in zip(db_names, ids) if i is None and n not in known_missing]
        if absent:
            raise IndexLoadError(
                f"{len(absent)} image(s) of {what} are not in {index._where()}, e.g. "
                f"{absent[:3]} (tried suffixes {IMAGE_NAME_SUFFIXES} and a {IMAGE_PREFIX} "
                f"prefix); rebuild the index from the store holding them ({BUILD_HINT})."
            )
        found = [(i, pos) for pos, i in enumerate(ids) if i is not None]
        self.to_db = np.full(index.size, -1, np.int64)
        if found:
            rows, positions = np.asarray(found, np.int64).T
            self.to_db[rows] = positions
        if np.count_nonzero(self.to_db >= 0) != len(found):
            seen = {}
            for name, i in zip(db_names, ids):
                if i is None:
                    continue
                if i in seen:
                    raise IndexLoadError(
                        f"{what}: {seen[i]!r} and {name!r} are the same indexed image "
                        f"{index.names[i]!r}; each database image must appear once."
                    )
                seen[i] = name
        self.extra = index.size - len(found)
        self._size = len(ids)

    @property
    def size(self) -> int:
        """Number of database images (the list's length)."""
        return self._size

    def search(self, queries: np.ndarray, k: int = DEFAULT_TOP_K) -> Tuple[np.ndarray, np.ndarray]:
        """`StoreIndex.search` with ids = positions in the database list (-1 padding)."""
        if isinstance(k, bool) or int(k) < 1:
            raise SearchError(f"k must be >= 1, got {k}.")
        k = min(int(k), self.size)
        ids, scores = self.base.search(queries, min(k + self.extra, self.base.size))
        mapped = np.where(ids >= 0, self.to_db[np.maximum(ids, 0)], -1)
        order = np.argsort(mapped < 0, axis=1, kind="stable")[:, :k]  # kept results first
        mapped = np.take_along_axis(mapped, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        scores[mapped < 0] = np.finfo(np.float32).min
        return mapped, scores


def _load_error(index_dir, problem):
    return IndexLoadError(f"index {index_dir}: {problem}; rebuild it ({BUILD_HINT} --overwrite).")


def read_manifest(index_dir):
    """The manifest dict of an index folder (IndexLoadError if absent or unreadable)."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise IndexLoadError(
            f"index folder {index_dir} does not exist; build it with "
            f"{BUILD_HINT} (DIR = {index_dir})."
        )
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        raise _load_error(
            index_dir, f"no {MANIFEST_FILE} (not an index folder, or an interrupted copy)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _load_error(index_dir, f"{path} is not readable JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise _load_error(
            index_dir, f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}"
        )
    required = ("method", "dim", "count", "files", "sources")
    absent = [key for key in required if key not in manifest]
    if absent or manifest["method"] not in METHODS:
        raise _load_error(
            index_dir,
            f"{path} lacks {absent} or names an unknown method {manifest.get('method')!r}",
        )
    return manifest


def changed_sources(manifest):
    """Source store files that are missing or whose size / mtime differ from the
    manifest: list of (path, reason).
    """
    changed = []
    for source in manifest["sources"]:
        path = Path(source["path"])
        try:
            stat = os.stat(path)
        except OSError:
            changed.append((path, "missing"))
            continue
        if stat.st_size != source["size"] or stat.st_mtime_ns != source["mtime_ns"]:
            changed.append(
                (
                    path,
                    f"size {stat.st_size} / mtime_ns {stat.st_mtime_ns}, "
                    f"indexed {source['size']} / {source['mtime_ns']}",
                )
            )
    return changed


def load_index(
    index_dir,
    dim: Optional[int] = None,
    check_sources: bool = True,
    nprobe: Optional[int] = None,
    ef_search: Optional[int] = None,
    mmap: bool = False,
) -> StoreIndex:
    """Reads an index folder written by `build_index` / `StoreIndex.save`.

    Args:
      index_dir: the folder.
      dim: expected descriptor dimension (e.g. the queries'); None: any.
      check_sources: refuse an index whose source store files are missing or changed
        (size / mtime) since the build; False to use it anyway (e.g. stores moved).
      nprobe / ef_search: search parameters replacing the built ones.
      mmap: memory-map the faiss file instead of reading it (flat / IVF indexes; the
        OS pages vectors in on demand).

    Returns:
      A `StoreIndex`.

    Raises:
      IndexLoadError: see the module docstring.
    """
    faiss = import_faiss()
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    for name, size in sorted(manifest["files"].items()):
        path = index_dir / name
        if not path.is_file():
            raise _load_error(index_dir, f"{path} is missing")
        if path.stat().st_size != size:
            raise _load_error(
                index_dir,
                f"{path} has {path.stat().st_size} bytes, the "
                f"manifest says {size} (truncated or replaced)",
            )
    if INDEX_FILE not in manifest["files"] or NAMES_FILE not in manifest["files"]:
        raise _load_error(index_dir, f"the manifest lists no {INDEX_FILE} / {NAMES_FILE}")
    if dim is not None and int(dim) != int(manifest["dim"]):
        raise IndexLoadError(
            f"index {index_dir} holds descriptors of dimension {manifest['dim']}, the "
            f"queries / database have {dim}: index the stores of the same model ("
            f"{BUILD_HINT} --overwrite)."
        )
    if check_sources:
        changed = changed_sources(manifest)
        if changed:
            path, reason = changed[0]
            raise IndexLoadError(
                f"index {index_dir} was built from {path}, which is {reason} "
                f"({len(changed)} changed source file(s)); rebuild the index ({BUILD_HINT} "
                "--overwrite), or load it with check_sources=False if the store was only "
                "moved."
            )
    try:
        names = json.loads((index_dir / NAMES_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _load_error(index_dir, f"{index_dir / NAMES_FILE} is not readable ({e})") from e
    flags = faiss.IO_FLAG_MMAP if mmap else 0
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE), flags)
    except RuntimeError as e:
        raise _load_error(
            index_dir,
            f"faiss cannot read {index_dir / INDEX_FILE} "
            f"({str(e).splitlines()[0] if str(e) else e})",
        ) from e
    count, dim_ = int(manifest["count"]), int(manifest["dim"])
    if (
        not isinstance(names, list)
        or len(names) != count
        or index.ntotal != count
        or (index.d != dim_)
    ):
        raise _load_error(
            index_dir,
            f"the manifest says {count} descriptors of dimension "
            f"{dim_}, the files hold {index.ntotal} of dimension "
            f"{index.d} and {len(names)} names",
        )
    loaded = StoreIndex(index, names, manifest, index_dir)
    if nprobe is not None or ef_search is not None:
        loaded.set_search_params(nprobe, ef_search)
    return loaded
