"""End-to-end retrieval evaluation: dataset folder + model -> metrics table and JSON.

DELG retrieval protocol (Cao et al. ECCV 2020, Sec. 4.1, App. B) on Revisited
Oxford/Paris (or the embedded default data, which has the same layout):

1. extract the database images and the queries **cropped to their bounding box**
   (like the official ``extract_features.py``: the crop is extracted with
   ``resize_factor = max(crop size) / max(image size)``, so it is resized as the
   whole image would be) with :func:`delg_tf.extract.main` into a resumable cache;
2. rank the database by global similarity (full ranking, or a top-k shortlist of a
   :class:`~delg_tf.retrieval.search.GlobalIndex` for +1M distractors);
3. re-rank the top ``shortlist_size`` by affine-RANSAC inliers (or the
   post-processing of ``EvaluateConfig``: DBA, alphaQE, SuperGlobal, diffusion,
   SuperGlobal then RANSAC, significant-inlier RANSAC; see
   :func:`delg_tf.evaluation.pipeline.postprocess`);
4. print the table (global-only vs re-ranked, Easy/Medium/Hard) and write the JSON.

API (used by ``python -m delg_tf.evaluate`` and ``delg_tf.demo``)::

    from delg_tf.evaluation.end_to_end import DatasetEvalConfig, evaluate_dataset

    results = evaluate_dataset(DatasetEvalConfig(
        model_path="demo_output/export",          # or delf_config=..., or db/query_features
        dataset="embedded", dataset_dir=None,      # None: build/find the embedded default data
        output_json="demo_output/results.json",   # cache_dir default: <json folder>/<dataset>_cache
    ))
    results["reranked"]["medium"]["mAP"]          # percent

``evaluate_dataset(config, extractor=None) -> dict`` returns the JSON content::

    {"global":   {"easy": {"mAP", "mP@1", "mP@5", "mP@10"}, "medium": {...}, "hard": {...}},
     "reranked": {...same...},         # "expanded" / "superglobal" too when they ran
     "ranking":  {"search_method", "rows", "num_db", "num_queries", "truncated"},
     "dataset":  {"name", "gnd_path", "images_dir", "num_db", "num_queries"},
     "features": {"db_store", "query_store", "reused_cache", "model"},
     "failed_images": {"database": [names], "queries": [names]},
     "postprocessing": {"dba", "query_expansion", "rerank", "stages": [{"stage",
                        "seconds", "ms_per_query", "offline"}], "skipped"},
     "config":   {EvaluateConfig fields}, "timings": {seconds per stage},
     "output_json": path}

Images that cannot be read (listed by the extractor in ``<cache>/*/errors.tsv``)
are evaluated as images without features (similarity 0, 0 inliers) and listed in
``failed_images``. The cache is tied to the model: ``<cache_dir>/cache_key.json``
records the model, config and extraction settings, and a cache made with another
model is refused (use another ``--cache_dir``, delete it, or pass
``replace_stale_cache=True`` / ``--replace_stale_cache`` to re-extract into it).
One run writes a cache at a time: while extracting into it, a run holds the lock
``<cache_dir>/.delg_tf.lock`` (:mod:`delg_tf.locking`) and another one refuses with one
line naming it; runs that find the cache complete only read it and take no lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from delg_tf.atomic import write_json_atomic
from delg_tf.configs import ConfigError, expect_choice
from delg_tf.evaluation.config import DATASETS, DEFAULT_DATASET, FULL_RANKING, EvaluateConfig
from delg_tf.locking import output_lock
from delg_tf.progress import progress_wrapper

# A database larger than this is searched with a top-k shortlist (``LARGE_DB_TOP_K``)
# unless ``EvaluateConfig.top_k`` is set: a full [num_db, num_queries] ranking of
# +1M images with 70 queries would take ~1 GB of int64 plus the scores.
FULL_RANKING_MAX_DB = 100_000
LARGE_DB_TOP_K = 1000
DEFAULT_EMBEDDED_PRESET = "default"
DEFAULT_OUTPUT_DIR = "eval_output"
RESULTS_NAME = "results.json"
DEFAULT_DEMO_EXPORT = Path("demo_output") / "export"  # written by `make demo` (delg_tf.demo)
CACHE_KEY_NAME = "cache_key.json"
DB_CACHE_SUBDIR = "db"
QUERY_CACHE_SUBDIR = "queries"
# Query crops were written here by earlier versions (now passed to the extractor as
# arrays); a stale cache is cleared of them too.
CROPS_SUBDIR = "query_crops"
EMBEDDED_GND_NAME = "gnd_embedded.pkl"
EMBEDDED_RETRIEVAL_SUBDIR = "retrieval"
SAVED_MODEL_FILES = ("saved_model.pb", "variables/variables.index")
CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetEvalConfig:
    """What to evaluate end to end (see the module doc).

    Attributes:
        output_json: metrics JSON; None = ``eval_output/<dataset>/results.json``.
        dataset: ``embedded`` (default), ``roxford5k`` or ``rparis6k``.
        dataset_dir: folder with ``gnd_<dataset>.pkl`` (or .mat) and ``jpg/``; for
            ``embedded`` the dataset root (with ``retrieval/``) or its retrieval folder;
            None with ``embedded`` builds (or finds) the embedded default data.
        embedded_preset: preset of the embedded data built when ``dataset_dir`` is None.
        gnd_path: explicit ground-truth file (overrides the one in ``dataset_dir``).
        model_path: SavedModel directory (delg_tf or official DELG export).
        delf_config: DelfConfig .pbtxt (its ``model_path`` unless ``model_path`` is given).
        db_features / query_features: already-extracted stores (no extraction).
        cache_dir: feature cache; None = ``<output_json folder>/cache``.
        distractor_list: +1M distractor list (paths relative to the images folder).
        evaluate: matching, re-ranking, search and metric settings.
        progress: progress bars (extraction, re-ranking).
        verbose: print the results table.
        replace_stale_cache: a cache made with another model (or extraction settings)
            is cleared and re-extracted instead of refused (e.g. after re-training).
    """

    output_json: Optional[str] = None
    dataset: str = DEFAULT_DATASET
    dataset_dir: Optional[str] = None
    embedded_preset: str = DEFAULT_EMBEDDED_PRESET
    gnd_path: Optional[str] = None
    model_path: Optional[str] = None
    delf_config: Optional[str] = None
    db_features: Optional[str] = None
    query_features: Optional[str] = None
    cache_dir: Optional[str] = None
    distractor_list: Optional[str] = None
    evaluate: EvaluateConfig = EvaluateConfig()
    progress: bool = True
    verbose: bool = True
    replace_stale_cache: bool = False

    def __post_init__(self):
        expect_choice("dataset", self.dataset, DATASETS)
        if (self.db_features is None) != (self.query_features is None):
            raise ConfigError(
                "pass both --db_features and --query_features (stores of the database and of "
                "the cropped queries), or neither."
            )
        if self.db_features is not None and (self.model_path or self.delf_config):
            raise ConfigError(
                "pass either a model (--model_path/--delf_config) to extract features, or "
                "already-extracted --db_features/--query_features, not both."
            )

    @property
    def output_path(self) -> Path:
        if self.output_json:
            return Path(self.output_json)
        return Path(DEFAULT_OUTPUT_DIR) / self.dataset / RESULTS_NAME

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.output_path.parent / "cache"


def resolve_model(config: DatasetEvalConfig) -> DatasetEvalConfig:
    """Fills in the demo export as the model when none was given and it exists.

    Raises:
        ConfigError: no model, no features and no ``demo_output/export``.
    """
    for flag, value, is_ok, expected in (
        ("--model_path", config.model_path, Path.is_dir, "a SavedModel directory"),
        ("--delf_config", config.delf_config, Path.is_file, "a DelfConfig .pbtxt file"),
    ):
        if value and not is_ok(Path(value)):
            raise FileNotFoundError(f"{flag}={value} not found; expected {expected}.")
    if config.db_features or config.model_path or config.delf_config:
        return config
    if (DEFAULT_DEMO_EXPORT / SAVED_MODEL_FILES[0]).is_file():
        print(f"evaluate: no --model_path given; using the demo export {DEFAULT_DEMO_EXPORT}")
        return dataclasses.replace(config, model_path=str(DEFAULT_DEMO_EXPORT))
    raise ConfigError(
        f"--model_path is required to extract features of the {config.dataset} dataset: a "
        "SavedModel from `python -m delg_tf.export` (or --delf_config=config.pbtxt, or "
        "already-extracted --db_features/--query_features). No default model was found at "
        f"{DEFAULT_DEMO_EXPORT} (`make demo` writes one there)."
    )


def open_dataset(config: DatasetEvalConfig):
    """The :class:`~delg_tf.data.revisitop.RevisitopDataset` of a config.

    ``embedded`` without ``dataset_dir`` builds (or finds) the embedded data with
    :func:`delg_tf.data.embedded.build_embedded_dataset`.
    """
    from delg_tf.data.revisitop import RevisitopDataset

    if config.dataset == "embedded":
        if config.dataset_dir is None and config.gnd_path is None:
            from delg_tf.data.embedded import build_embedded_dataset

            root = build_embedded_dataset(preset=config.embedded_preset).retrieval_dir
        elif config.dataset_dir is not None:
            root = Path(config.dataset_dir)
            if (root / EMBEDDED_RETRIEVAL_SUBDIR / EMBEDDED_GND_NAME).is_file():
                root = root / EMBEDDED_RETRIEVAL_SUBDIR
        else:
            root = Path(config.gnd_path).parent
        gnd = config.gnd_path or root / EMBEDDED_GND_NAME
        if not Path(gnd).is_file():
            raise FileNotFoundError(
                f"--dataset_dir={config.dataset_dir}: no {EMBEDDED_GND_NAME} in {root} or "
                f"{root / EMBEDDED_RETRIEVAL_SUBDIR}; expected an embedded dataset built by "
                "delg_tf.data.embedded (omit --dataset_dir to build the default one)."
            )
        return RevisitopDataset.from_dir(
            root, name="embedded", gnd_path=gnd, distractor_list=config.distractor_list
        )
    root = Path(config.dataset_dir) if config.dataset_dir else Path(config.gnd_path).parent
    if not root.is_dir():
        raise FileNotFoundError(
            f"--dataset_dir={root} does not exist; expected the folder with "
            f"gnd_{config.dataset}.pkl and jpg/ (revisitop layout)."
        )
    return RevisitopDataset.from_dir(
        root,
        name=config.dataset,
        gnd_path=config.gnd_path,
        distractor_list=config.distractor_list,
    )


def _file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_fingerprint(config: DatasetEvalConfig) -> dict:
    """Identifies the model and extraction settings a feature cache was made with."""
    key = {"format": CACHE_FORMAT_VERSION, "binarize": config.evaluate.matching.binary_descriptors}
    if config.delf_config:
        path = Path(config.delf_config)
        key["delf_config_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if config.model_path:
        model = Path(config.model_path)
        key["model_files"] = [
            _file_fingerprint(model / f) for f in SAVED_MODEL_FILES if (model / f).is_file()
        ]
        key["model_path"] = str(model.resolve())
    return key


def _check_cache_key(cache: Path, key: dict, replace_stale: bool = False):
    """Refuses (or, with ``replace_stale``, clears) a cache made with another model."""
    path = cache / CACHE_KEY_NAME
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            stored = None
        if stored == key:
            return
        if not replace_stale:
            raise ConfigError(
                f"--cache_dir={cache} holds features of another model or settings "
                f"({path}: {stored}; this run: {key}). Pass --replace_stale_cache to "
                f"re-extract into it, use another --cache_dir, or delete {cache}."
            )
        # Only what this module wrote; the folder may hold other files of the user.
        for sub in (DB_CACHE_SUBDIR, QUERY_CACHE_SUBDIR, CROPS_SUBDIR):
            shutil.rmtree(cache / sub, ignore_errors=True)
        path.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    write_json_atomic(key, path, indent=1, sort_keys=True)


def _store_names(store: Path) -> set:
    from delg_tf.extraction.store import FeatureStore, StoreError

    try:
        with FeatureStore(store) as opened:
            return set(opened.names)
    except (OSError, StoreError):
        return set()


@dataclasses.dataclass(frozen=True)
class QueryCrop:
    """A query image cropped to its bbx, loaded when extracted (a ``delg_tf.extract``
    image source: nothing is written to disk, whatever the query's name).

    Attributes:
        path: the query image file.
        box: (x1, y1, x2, y2) in integer pixels (the bbx rounded like
            :func:`delg_tf.data.revisitop.crop_to_bbx`).
    """

    path: Path
    box: tuple

    def __call__(self) -> np.ndarray:
        """uint8 RGB [y2 - y1, x2 - x1, 3]; raises ImageLoadError like an image file."""
        from PIL import Image

        from delg_tf.data.errors import ImageLoadError
        from delg_tf.data.images import MIN_IMAGE_SIDE, load_image_rgb
        from delg_tf.data.revisitop import crop_to_bbx

        image = load_image_rgb(self.path, alpha="drop")
        crop = np.asarray(crop_to_bbx(Image.fromarray(image), self.box))
        if min(crop.shape[:2]) < MIN_IMAGE_SIDE:
            raise ImageLoadError(
                self.path,
                "too_small",
                f"crop to bbx {list(self.box)} is {crop.shape[1]}x{crop.shape[0]}, smaller than "
                f"the minimum side {MIN_IMAGE_SIDE} px (MIN_IMAGE_SIDE) the network needs; "
                "skipped",
            )
        return np.ascontiguousarray(crop)

    def __str__(self):
        return f"{self.path} cropped to {list(self.box)}"


def query_items(dataset) -> list:
    """(name, image source, resize_factor) of every query cropped to its bbx.

    Like the official ``extract_features.py``, a crop is extracted with
    ``resize_factor = max(crop size) / max(image size)``, so it is resized as the
    whole image would be. A query without bbx, or whose bbx (rounded to pixels) is the
    whole image, is its image file as is, without resize factor (the extractor's
    default 1.0): the same pixels and resizing as that crop.

    Args:
        dataset: RevisitopDataset (``qimlist``, ``gnd`` bbx, ``query_path``).

    Returns:
        Items for ``delg_tf.extract.main(config, paths=items)``.

    Raises:
        FileNotFoundError: a query image is missing.
    """
    from PIL import Image

    items = []
    for q, name in enumerate(dataset.qimlist):
        source = dataset.query_path(q)
        if not source.is_file():
            raise FileNotFoundError(
                f"query image {source} not found; --dataset_dir must contain jpg/<name>.jpg "
                "for every query of the ground truth."
            )
        bbx = dataset.gnd[q].get("bbx")
        if bbx is None:
            items.append((name, source, None))
            continue
        box = tuple(int(round(float(v))) for v in np.ravel(bbx))
        try:
            with Image.open(source) as image:
                width, height = image.size
        except (OSError, Image.DecompressionBombError):
            items.append((name, source, None))  # not an image: logged by the extraction.
            continue
        if box == (0, 0, width, height):
            items.append((name, source, None))
            continue
        crop_side = max(box[2] - box[0], box[3] - box[1])
        items.append((name, QueryCrop(source, box), crop_side / max(width, height)))
    return items


def _extract_set(items, output_dir: Path, settings, get_extractor: Callable) -> tuple:
    """Extracts ``items`` into ``output_dir`` with delg_tf.extract unless all are cached.

    The extractor is only built (the model loaded) when something is left to
    extract, and before ``extract.main`` so that a model that cannot be loaded is
    an error, not one logged failure per image.

    Returns:
        (store path, whether the cached store was reused without extraction).
    """
    from delg_tf import extract

    settings = dataclasses.replace(settings, output_dir=str(output_dir))
    store = settings.store_path
    if store.is_file() and {item[0] for item in items} <= _store_names(store):
        print(f"extract: {store} holds all {len(items)} images: reused, 0 extracted")
        return store, True
    extractor = get_extractor()
    return extract.main(settings, items, extractor=extractor), False


def extract_retrieval_stores(dataset, db_dir, query_dir, settings, extractor=None) -> tuple:
    """Extracts the database images and the bbx-cropped queries (:func:`query_items`) of
    a dataset into two feature stores with ``delg_tf.extract`` (resumable; a store that
    already holds every image is reused as is).

    Used by :func:`extract_dataset` (the evaluation cache) and ``delg_tf.demo``.

    Args:
        dataset: RevisitopDataset.
        db_dir, query_dir: output folders of the database and query stores.
        settings: ``delg_tf.extract.ExtractConfig`` with the model and store options
            (its ``output_dir`` is replaced by ``db_dir`` / ``query_dir``).
        extractor: optional ready extractor (``image -> DelgFeatures``; it must accept
            ``resize_factor=`` for cropped queries); default: built from ``settings``
            when the first uncached image is met.

    Returns:
        (db store path, query store path, reused: bool = nothing was extracted).
    """
    from delg_tf import extract

    built = [extractor]

    def get_extractor():
        if built[0] is None:
            built[0] = extract.make_extractor(settings)
        return built[0]

    db_items = [(name, dataset.image_path(i)) for i, name in enumerate(_db_names(dataset))]
    queries = query_items(dataset)  # before extracting: a missing query fails fast.
    db_store, db_reused = _extract_set(db_items, Path(db_dir), settings, get_extractor)
    query_store, q_reused = _extract_set(queries, Path(query_dir), settings, get_extractor)
    return db_store, query_store, db_reused and q_reused


def extract_dataset(dataset, config: DatasetEvalConfig, extractor: Optional[Callable] = None):
    """Extracts database images and bbx-cropped queries into the cache (resumable).

    Args:
        dataset: RevisitopDataset.
        config: model, cache folder, binarisation.
        extractor: see :func:`extract_retrieval_stores`.

    Returns:
        (db store path, query store path, reused: bool = nothing was extracted).

    Raises:
        LockedError: another run is writing the cache (a complete one is only read).
    """
    from delg_tf import extract

    cache = config.cache_path
    key = model_fingerprint(config)
    settings = extract.ExtractConfig(
        output_dir=str(cache),
        delf_config=config.delf_config,
        model_path=config.model_path,
        binarize=config.evaluate.matching.binary_descriptors,
        progress=config.progress,
    )
    # One writer per cache (delg_tf.locking); a complete cache of this key is only read.
    complete = _cache_is_complete(cache, key, dataset, settings)
    with contextlib.nullcontext() if complete else output_lock(cache, f"--cache_dir={cache}"):
        _check_cache_key(cache, key, config.replace_stale_cache)
        return extract_retrieval_stores(
            dataset, cache / DB_CACHE_SUBDIR, cache / QUERY_CACHE_SUBDIR, settings, extractor
        )


def _cache_is_complete(cache: Path, key: dict, dataset, settings) -> bool:
    """True if ``cache`` was made with ``key`` and its stores hold every database image and
    query: evaluating then only reads it (no lock, nothing written).
    """
    try:
        stored = json.loads((cache / CACHE_KEY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = {DB_CACHE_SUBDIR: _db_names(dataset), QUERY_CACHE_SUBDIR: list(dataset.qimlist)}
    return stored == key and all(
        set(names)
        <= _store_names(dataclasses.replace(settings, output_dir=str(cache / sub)).store_path)
        for sub, names in wanted.items()
    )


def _db_names(dataset) -> list:
    """Database names in index order: imlist, then the +1M distractors."""
    return list(dataset.imlist) + [
        d[: -len(".jpg")] if d.lower().endswith(".jpg") else d for d in dataset.distractors
    ]


def effective_evaluate_config(config: EvaluateConfig, num_db: int) -> EvaluateConfig:
    """Switches to a top-k shortlist for databases above ``FULL_RANKING_MAX_DB``."""
    if config.top_k == FULL_RANKING and num_db > FULL_RANKING_MAX_DB:
        return dataclasses.replace(config, top_k=max(LARGE_DB_TOP_K, config.shortlist_size))
    return config


def evaluate_dataset(config: DatasetEvalConfig, extractor: Optional[Callable] = None) -> dict:
    """Extracts (cached), searches, re-ranks and scores a dataset; writes the JSON.

    Args:
        config: see :class:`DatasetEvalConfig`.
        extractor: optional ready extractor (tests, or a model already in memory:
            ``DelgExtractor.from_model(model, delf_config)``); the cache key still
            comes from ``config.model_path``/``delf_config``.

    Returns:
        The results dict written to ``config.output_path`` (see the module doc).

    Raises:
        ConfigError: no model or features; a cache made with another model.
        FileNotFoundError: dataset, gnd or query images missing.
    """
    from delg_tf.evaluation.pipeline import (
        FeatureInputError,
        StoreFeatures,
        evaluate_store_features,
    )
    from delg_tf.evaluation.ranks import write_json

    timings = {}
    start = time.perf_counter()
    if config.db_features is None and extractor is None:
        config = resolve_model(config)  # before building any data: fail fast.
    dataset = open_dataset(config)
    if config.db_features is not None:
        db_store, query_store, reused = Path(config.db_features), Path(config.query_features), True
    else:
        db_store, query_store, reused = extract_dataset(dataset, config, extractor)
    timings["extract_s"] = time.perf_counter() - start
    names = _db_names(dataset)
    evaluate = effective_evaluate_config(config.evaluate, len(names))
    progress = progress_wrapper("rerank", "query", enabled=config.progress)

    extracted = config.db_features is None
    binary = evaluate.matching.binary_descriptors
    with (
        StoreFeatures(db_store, names, binary, allow_missing=extracted, what="--db_features") as db,
        StoreFeatures(
            query_store, dataset.qimlist, binary, allow_missing=extracted, what="--query_features"
        ) as queries,
    ):
        failed = {"database": db.missing, "queries": queries.missing}
        all_failed = [
            what
            for what, missing, total in (
                ("database image", db.missing, len(names)),
                ("query", queries.missing, dataset.num_queries),
            )
            if total and len(missing) == total
        ]
        if all_failed:
            raise FeatureInputError(
                f"no {all_failed[0]} could be extracted (see errors.tsv under "
                f"{config.cache_path}); check --model_path / --delf_config and the images "
                "in --dataset_dir."
            )
        if config.verbose and (db.missing or queries.missing):
            print(
                f"evaluate: {len(db.missing)} database image(s) and {len(queries.missing)} "
                "queries could not be extracted (see errors.tsv in the cache); they are "
                "evaluated without features."
            )
        extra = {
            "dataset": {
                "name": dataset.name,
                "gnd_path": str(dataset.gnd_path),
                "images_dir": str(dataset.images_dir),
                "num_db": len(names),
                "num_queries": dataset.num_queries,
            },
            "features": {
                "db_store": str(db_store),
                "query_store": str(query_store),
                "reused_cache": bool(reused),
                "model": config.model_path or config.delf_config,
            },
            "failed_images": failed,
        }
        evaluation = evaluate_store_features(
            dataset.gnd,
            db,
            queries,
            evaluate,
            output_json=None,
            progress=progress,
            verbose=config.verbose,
            db_names=names,
        )
    timings.update(evaluation.timings)
    results = {
        **evaluation.results,
        "ranking": evaluation.ranking,
        **extra,
        "postprocessing": evaluation.postprocessing,
        "config": evaluate.record(),
        "timings": timings,
    }
    out = write_json(results, config.output_path)
    results["output_json"] = str(out)
    if config.verbose:
        print(f"wrote {out}")
    return results


def main(config: DatasetEvalConfig, extractor: Optional[Callable] = None) -> Path:
    """:func:`evaluate_dataset` returning the path of the JSON written."""
    return Path(evaluate_dataset(config, extractor)["output_json"])
