"""Evaluation from extracted features: global search, re-ranking, revisitop metrics.

DELG retrieval (Cao et al. ECCV 2020, Sec. 4.1): rank the database by global
descriptor similarity, re-rank the top 100 by the number of affine-RANSAC
inliers of local features (ties by global similarity), and report revisitop
Easy/Medium/Hard mAP and mP@k for both rankings.

Inputs are numpy arrays, so this module does not depend on how features were
extracted; :func:`load_store_features` reads them from a delg_tf HDF5 feature
store (``delg_tf.extraction.store``, imported lazily).

Keypoints are **(y, x)** pixel coordinates in the original image (DELF
convention; the store's ``locations``). Query features must be extracted from
the query image *cropped to its bbx*, with keypoints in the cropped frame.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from delg_tf.evaluation.config import EvaluateConfig
from delg_tf.evaluation.ranks import write_json
from delg_tf.evaluation.revisitop import evaluate_revisitop, format_results_table
from delg_tf.retrieval import search
from delg_tf.retrieval.rerank import LocalFeatures, MatchingConfig, Reranker

IMAGE_NAME_SUFFIXES = ("", ".jpg", ".JPG", ".jpeg", ".png")


class FeatureInputError(ValueError):
    """Features do not match the dataset (counts, dimensions, missing images)."""


def matching_config(config: EvaluateConfig, binary: bool = False) -> MatchingConfig:
    """The re-ranking parameters of an :class:`EvaluateConfig`."""
    return MatchingConfig(
        descriptor_threshold=config.descriptor_threshold,
        ransac_residual_threshold=config.ransac_residual_threshold,
        ransac_iterations=config.ransac_iterations,
        min_inliers=config.min_inliers,
        use_ratio_test=config.use_ratio_test,
        ratio_test_threshold=config.ratio_test_threshold,
        binary_descriptors=binary,
        seed=config.seed,
    )


def _max_gnd_index(gnd: Sequence[Mapping]) -> int:
    """Largest database index referenced by the ground truth (-1 if none)."""
    indices = [
        np.ravel(np.asarray(g.get(k, []), dtype=np.int64))
        for g in gnd
        for k in ("easy", "hard", "junk")
    ]
    indices = [i for i in indices if i.size]
    return int(max(i.max() for i in indices)) if indices else -1


@dataclasses.dataclass
class FeaturesEvaluation:
    """Result of :func:`evaluate_features`.

    Attributes:
        global_ranks: int [num_db, num_queries] ranking by global similarity.
        reranked_ranks: int [num_db, num_queries] after re-ranking (None if skipped).
        results: ``{"global": metrics, "reranked": metrics}`` (percent).
        timings: seconds per stage.
    """

    global_ranks: np.ndarray
    reranked_ranks: Optional[np.ndarray]
    results: dict
    timings: dict


def evaluate_features(
    db_global: np.ndarray,
    query_global: np.ndarray,
    gnd: Sequence[Mapping],
    db_local: Optional[Sequence[LocalFeatures]] = None,
    query_local: Optional[Sequence[LocalFeatures]] = None,
    config: EvaluateConfig = EvaluateConfig(),
    binary: bool = False,
    output_json=None,
    progress: Optional[Callable] = None,
    verbose: bool = True,
) -> FeaturesEvaluation:
    """Global-only vs re-ranked revisitop evaluation from feature arrays.

    Args:
        db_global: float [num_db, D] global descriptors (normalised here).
        query_global: float [num_queries, D].
        gnd: revisitop ground truth (dicts with easy/hard/junk), one per query.
        db_local: num_db LocalFeatures (keypoints (y, x), descriptors [N, d]);
            None to skip re-ranking.
        query_local: num_queries LocalFeatures of the cropped queries.
        config: shortlist size, matching thresholds, workers, kappas.
        binary: local descriptors are packed bits (DELG*).
        output_json: if given, the JSON ``{"global": {...}, "reranked": {...},
            "config": {...}}`` is written there.
        progress: optional iterator wrapper (e.g. tqdm) over queries.
        verbose: print the results table.

    Returns:
        FeaturesEvaluation.

    Raises:
        FeatureInputError: counts or dimensions do not match the ground truth.
    """
    db_global = np.asarray(db_global, dtype=np.float32)
    query_global = np.asarray(query_global, dtype=np.float32)
    if query_global.ndim != 2 or query_global.shape[0] != len(gnd):
        raise FeatureInputError(
            f"query_global must be [num_queries={len(gnd)}, D], got {query_global.shape}."
        )
    if db_global.ndim != 2 or db_global.shape[1] != query_global.shape[1]:
        raise FeatureInputError(
            f"db_global must be [num_db, D={query_global.shape[1]}], got {db_global.shape}."
        )
    max_index = _max_gnd_index(gnd)
    if max_index >= db_global.shape[0]:
        raise FeatureInputError(
            f"the ground truth refers to database image {max_index} but only "
            f"{db_global.shape[0]} database descriptors were given."
        )
    timings = {}
    start = time.perf_counter()
    ranks, scores = search.full_ranking(
        search.l2_normalize(query_global), search.l2_normalize(db_global)
    )
    timings["global_search_s"] = time.perf_counter() - start
    results = {"global": evaluate_revisitop(ranks, gnd, config.kappas)}
    reranked = None
    if db_local is not None and query_local is not None and config.shortlist_size > 0:
        if len(db_local) != db_global.shape[0] or len(query_local) != len(gnd):
            raise FeatureInputError(
                f"need one LocalFeatures per image: got {len(db_local)} database (expected "
                f"{db_global.shape[0]}) and {len(query_local)} queries (expected {len(gnd)})."
            )
        start = time.perf_counter()
        with Reranker(
            matching_config(config, binary), config.shortlist_size, config.num_workers
        ) as reranker:
            reranked = reranker.rerank_all(
                ranks, query_local, db_local, scores=scores, progress=progress
            )
        timings["rerank_s"] = time.perf_counter() - start
        results["reranked"] = evaluate_revisitop(reranked, gnd, config.kappas)
    if verbose:
        print(format_results_table(results, config.kappas))
    if output_json is not None:
        write_json(
            {**results, "config": dataclasses.asdict(config), "timings": timings}, output_json
        )
    return FeaturesEvaluation(ranks, reranked, results, timings)


def _lookup(store, name: str) -> str:
    for suffix in IMAGE_NAME_SUFFIXES:
        for candidate in (name + suffix, f"jpg/{name}{suffix}"):
            if candidate in store:
                return candidate
    raise FeatureInputError(
        f"image {name!r} is not in the feature store {store.path} "
        f"(tried suffixes {IMAGE_NAME_SUFFIXES} and a jpg/ prefix); "
        "extract it first or check the store matches the dataset."
    )


def load_store_features(store_path, names: Sequence[str], binary: bool = False):
    """Reads global and local features of ``names`` from a delg_tf HDF5 feature store.

    Args:
        store_path: ``.h5`` store or parts directory (``delg_tf.extraction.store``).
        names: image names in dataset order (revisitop ``imlist``/``qimlist``,
            without extension; ``.jpg`` is tried too).
        binary: return packed-bit descriptors (``descriptors_binary``, DELG*).

    Returns:
        (global float32 [len(names), D], list of LocalFeatures with (y, x) keypoints).

    Raises:
        FeatureInputError: an image is missing or has no global descriptor.
    """
    from delg_tf.extraction.store import FeatureStore

    store = FeatureStore(store_path)
    globals_, locals_ = [], []
    for name in names:
        feats = store.get(_lookup(store, name))
        if "global_descriptor" not in feats:
            raise FeatureInputError(
                f"{store_path}: image {name!r} has no global descriptor; "
                "extract with global features enabled."
            )
        key = "descriptors_binary" if binary else "descriptors"
        if key not in feats:
            raise FeatureInputError(
                f"{store_path}: no '{key}' dataset; extract with binarisation "
                "enabled or evaluate without binary descriptors."
            )
        globals_.append(feats["global_descriptor"])
        locals_.append(LocalFeatures(feats["locations"], feats[key]))
    return np.stack(globals_).astype(np.float32), locals_


def evaluate_stores(
    gnd_path,
    db_store,
    query_store,
    config: EvaluateConfig,
    output_json,
    binary: bool = False,
    progress: Optional[Callable] = None,
) -> Path:
    """Revisitop evaluation from feature stores (database and cropped queries).

    Args:
        gnd_path: revisitop ground truth (.pkl/.mat).
        db_store: feature store of the database images.
        query_store: feature store of the queries (cropped to bbx); may equal db_store
            only if the stored query features were extracted from crops.
        config: evaluation settings.
        output_json: JSON output path.
        binary: use packed-bit descriptors.
        progress: optional iterator wrapper.

    Returns:
        Path of the JSON written.
    """
    from delg_tf.data.revisitop import load_gnd

    cfg = load_gnd(gnd_path, require_bbx=False)
    db_global, db_local = load_store_features(db_store, cfg["imlist"], binary)
    q_global, q_local = load_store_features(query_store, cfg["qimlist"], binary)
    evaluate_features(
        db_global,
        q_global,
        cfg["gnd"],
        db_local,
        q_local,
        config,
        binary,
        output_json=output_json,
        progress=progress,
    )
    return Path(output_json)
