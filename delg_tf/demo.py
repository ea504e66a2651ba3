"""``python -m delg_tf.demo``: the whole DELG pipeline on the embedded photos (``make demo``).

    python -m delg_tf.demo --output_dir=demo_output

One run, on the embedded default dataset (photos shipped with scikit-image, many
views per "landmark" made with known homographies; no download):

1. trains DELG briefly from ``configs/demo.flags`` (custom train step, both heads,
   tape-level gradient stopping) into ``OUT/train``, on the training views of the
   first 5 of the 10 landmarks only (the trainer's ``--embedded_train_landmarks=5`` in
   ``configs/demo.flags``; ``--train_landmarks`` overrides it): like the paper (trained
   on GLDv2, tested on Oxford/Paris) the evaluated queries show unseen landmarks;
2. reads the attention threshold tau from the run: the paper (Cao et al., ECCV
   2020, Sec. 4.1) sets it to the median attention score of the last training
   iterations, which the trainer logs as the ``attention_median`` scalar;
3. exports the SavedModel (``OUT/export``) with tau baked in;
4. extracts the database and the queries (cropped to their bbx) with
   ``delg_tf.extract`` into ``OUT/features/{database,queries}``;
5. ranks the queries of the unseen landmarks against the whole database by global
   descriptors, re-ranks the top 20 by pycolmap affine-RANSAC inliers and, beside
   it, the top 400 (here the whole database) by SuperGlobal (global descriptors
   only), and evaluates revisitop Easy/Medium/Hard mAP and mP@k for the three,
   written to ``OUT/results.json``;
6. draws ``OUT/matches.png`` (a query and its best database image with inlier
   correspondences) and ``OUT/ranking_grid.png`` (top-k before/after re-ranking).

A rerun with the same ``--output_dir`` skips finished stages (training resumes
from its last checkpoint, extraction from its crash-safe parts); evaluation and
the PNGs are always recomputed from the features. Every stage is a plain
function of :class:`DemoConfig`; flags live only in this module's ``_define_flags``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional, Tuple

# Before TensorFlow is imported: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from delg_tf import atomic  # noqa: E402
from delg_tf.cli import EXIT_USAGE_ERROR  # noqa: E402
from delg_tf.configs import ConfigError, expect, require  # noqa: E402
from delg_tf.progress import progress_wrapper  # noqa: E402

DEFAULT_FLAGFILE = "configs/demo.flags"
DEFAULT_OUTPUT_DIR = "demo_output"
EMBEDDED_PRESET = "default"
# The DelgModel logs the median attention score of each batch under this tag; the
# paper's tau is its value at the end of training (Sec. 4.1).
ATTENTION_MEDIAN_TAG = "attention_median"
TRAIN_EVENTS_SUBDIR = "train"
# Average of the last few logged medians (batch noise); at least the last one.
ATTENTION_MEDIAN_LAST_N = 4
MEDIUM = "medium"
PROTOCOLS = ("easy", "medium", "hard")
# The paper re-ranks the top 100 of ~5k Revisited Oxford/Paris images (2%); the demo
# database has 86 images with 7 relevant per query, where 100 would be all of it.
DEFAULT_SHORTLIST_SIZE = 20
# As in the paper (trained on GLDv2, tested on other landmarks), DELG trains on the first
# landmarks of the embedded data only; the queries of the others are evaluated. Set by
# the trainer flag --embedded_train_landmarks in configs/demo.flags (this is its value).
DEFAULT_TRAIN_LANDMARKS = 5
DEFAULT_GRID_TOP_K = 5
DEFAULT_NUM_WORKERS = 2
DEFAULT_MAX_FEATURE_NUM = 1000  # paper / official extractor.
# For the ground-truth check of RANSAC inliers (pixels, same as the RANSAC threshold).
GT_REPROJECTION_THRESHOLD_PX = 20.0
# Names under --output_dir.
TRAIN_SUBDIR = "train"
DATA_SUBDIR = "data"
EXPORT_SUBDIR = "export"
FEATURES_SUBDIR = "features"
RESULTS_JSON = "results.json"
# Wall times live apart from results.json, so that two runs give identical results.
TIMINGS_JSON = "timings.json"
THRESHOLD_JSON = "attention_threshold.json"
MATCHES_PNG = "matches.png"
GRID_PNG = "ranking_grid.png"
SAVED_MODEL_FILE = "saved_model.pb"
EXIT_RUN_ERROR = 3


class DemoError(RuntimeError):
    """A demo stage cannot run (the message names the file/flag and the fix)."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Validated configuration of a demo run.

    Attributes:
        output_dir: everything is written under this folder (--output_dir).
        flagfile: training flagfile (--flagfile, default configs/demo.flags).
        train_flags: extra training flags appended after the flagfile (tests use
            e.g. ``--max_iters=200``); ``--logdir``/``--data_dir`` are always set
            to ``output_dir/train`` and ``output_dir/data``.
        score_threshold: attention threshold tau; None = read the trained run's
            final ``attention_median`` (the paper's rule).
        image_scales: local-feature pyramid scales of the export (None = the
            export's default 0.25 ... 2.0).
        max_feature_num: local features kept per image.
        train_landmarks: None = the flagfile's ``--embedded_train_landmarks``
            (configs/demo.flags: 5), else that trainer flag's value: DELG trains on
            the landmarks with id < this (the embedded data has 10) and is evaluated
            on the queries of the others (unseen landmarks, as the paper's GLDv2 ->
            Oxford/Paris); 0 = train on all and evaluate every query.
        shortlist_size: top-k of the global ranking re-ranked.
        grid_top_k: results per row of the before/after grid.
        num_workers: threads for re-ranking.
        progress: progress bars.
    """

    output_dir: str = DEFAULT_OUTPUT_DIR
    flagfile: str = DEFAULT_FLAGFILE
    train_flags: Tuple[str, ...] = ()
    score_threshold: Optional[float] = None
    image_scales: Optional[Tuple[float, ...]] = None
    max_feature_num: int = DEFAULT_MAX_FEATURE_NUM
    train_landmarks: Optional[int] = None
    shortlist_size: int = DEFAULT_SHORTLIST_SIZE
    grid_top_k: int = DEFAULT_GRID_TOP_K
    num_workers: int = DEFAULT_NUM_WORKERS
    progress: bool = True

    def __post_init__(self):
        require(self.output_dir, "output_dir", "where the demo writes its outputs")
        checks = [
            (self.max_feature_num >= 1, "max_feature_num", "an integer >= 1"),
            (
                self.train_landmarks is None or self.train_landmarks >= 0,
                "train_landmarks",
                "an integer >= 0 (or unset for the flagfile's --embedded_train_landmarks)",
            ),
            (self.shortlist_size >= 1, "shortlist_size", "an integer >= 1"),
            (self.grid_top_k >= 1, "grid_top_k", "an integer >= 1"),
            (self.num_workers >= 1, "num_workers", "an integer >= 1"),
            (
                self.score_threshold is None or self.score_threshold >= 0,
                "score_threshold",
                "a float >= 0 (or unset to use the trained attention median)",
            ),
        ]
        for ok, name, expected in checks:
            expect(ok, name, expected, getattr(self, name))

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    @property
    def logdir(self) -> Path:
        return self.root / TRAIN_SUBDIR

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_SUBDIR

    @property
    def export_path(self) -> Path:
        return self.root / EXPORT_SUBDIR

    @property
    def features_dir(self) -> Path:
        return self.root / FEATURES_SUBDIR


def resolve_flagfile(flagfile: str) -> Path:
    """The flagfile as given, else relative to the source checkout (``configs/``)."""
    path = Path(flagfile).expanduser()
    if path.is_file():
        return path
    candidate = Path(__file__).resolve().parent.parent / flagfile
    if not path.is_absolute() and candidate.is_file():
        return candidate
    raise DemoError(
        f"--flagfile={flagfile} does not exist (also looked for {candidate}); "
        "run from the repository root or pass --flagfile=path/to/demo.flags."
    )


def _log(message: str):
    print(f"[demo] {message}", flush=True)


# --------------------------------------------------------------------------
# Stage 1: training
# --------------------------------------------------------------------------


def train_configs(config: DemoConfig):
    """(TrainConfig, model config) from the flagfile, with the demo's logdir/data_dir and,
    if `train_landmarks` is set, that `--embedded_train_landmarks` (the trainer then
    builds the TFRecords of those landmarks only).
    """
    from delg_tf import train as train_entry

    landmarks = (
        []
        if config.train_landmarks is None
        else [f"--embedded_train_landmarks={config.train_landmarks}"]
    )
    return train_entry.parse_flags(
        [
            "delg_tf.demo",
            f"--flagfile={resolve_flagfile(config.flagfile)}",
            *landmarks,
            *config.train_flags,
            f"--logdir={config.logdir}",
            f"--data_dir={config.data_dir}",
        ]
    )


def evaluation_subset(train_landmarks: int, gnd_cfg, transforms) -> dict:
    """The ground truth restricted to queries of landmarks not used for training
    (ids >= `train_landmarks`, the trainer's `embedded_train_landmarks`; 0 = all).
    """
    if not train_landmarks:
        return gnd_cfg
    keep = [
        i
        for i, name in enumerate(gnd_cfg["qimlist"])
        if transforms["images"][name]["landmark_id"] >= train_landmarks
    ]
    if not keep:
        raise DemoError(
            f"--embedded_train_landmarks={train_landmarks} leaves no unseen "
            "landmark to query; use a smaller value (0 = all landmarks)."
        )
    return {
        **gnd_cfg,
        "qimlist": [gnd_cfg["qimlist"][i] for i in keep],
        "gnd": [gnd_cfg["gnd"][i] for i in keep],
    }


def trained_step(logdir) -> int:
    """Step of the latest checkpoint in `logdir` (0 if none)."""
    import tensorflow as tf

    from delg_tf.training.runs import STEP_CHECKPOINT_KEY

    latest = tf.train.latest_checkpoint(str(logdir))
    if latest is None:
        return 0
    return int(tf.train.load_checkpoint(latest).get_tensor(STEP_CHECKPOINT_KEY))


def trained_landmarks(train_config) -> int:
    """Landmark ids < this are the training ones (0: all, e.g. a flagfile with its own
    data); the demo evaluates the queries of the others.
    """
    if train_config.data_source != "embedded":
        return 0
    return train_config.embedded_train_landmarks


def train_stage(config: DemoConfig) -> Path:
    """Trains (or resumes, or skips when finished) DELG; returns the logdir."""
    from delg_tf import train as train_entry

    train_config, model_config = train_configs(config)
    if train_config.model_family != "delg":
        raise DemoError(
            f"{config.flagfile} sets --model_family={train_config.model_family}; "
            "the demo needs a DELG model (--model_family=delg)."
        )
    done = trained_step(config.logdir)
    if done >= train_config.max_iters:
        _log(f"train: already trained to step {done} in {config.logdir}, skipped")
        return config.logdir
    _log(
        f"train: {train_config.max_iters} steps from {config.flagfile}"
        + (f" (resuming at step {done})" if done else "")
        + f" -> {config.logdir}"
    )
    return train_entry.main(train_config, model_config)


def read_attention_threshold(logdir, last_n: int = ATTENTION_MEDIAN_LAST_N) -> dict:
    """The paper's tau: the trained run's final median attention score.

    Args:
        logdir: training logdir (TensorBoard events in ``logdir/train``).
        last_n: number of last logged medians averaged (batch-to-batch noise).

    Returns:
        ``{"tau": float, "steps": [...], "values": [...], "source": str}``.

    Raises:
        DemoError: no ``attention_median`` scalar in the events.
    """
    import glob

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    event_dir = Path(logdir) / TRAIN_EVENTS_SUBDIR
    series = {}
    for path in sorted(glob.glob(str(event_dir / "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == ATTENTION_MEDIAN_TAG:
                    series[int(event.step)] = float(tf.make_ndarray(value.tensor))
    if not series:
        raise DemoError(
            f"no '{ATTENTION_MEDIAN_TAG}' scalar in the TensorBoard events of "
            f"{event_dir}; train a DELG model there first (or pass "
            "--score_threshold=TAU)."
        )
    steps = sorted(series)[-last_n:]
    values = [series[s] for s in steps]
    return {
        "tau": float(np.mean(values)),
        "steps": steps,
        "values": values,
        "source": f"mean of the last {len(steps)} '{ATTENTION_MEDIAN_TAG}' scalars in {event_dir}",
    }


def attention_threshold_stage(config: DemoConfig) -> float:
    """Tau from the flag or from the run; written to ``OUT/attention_threshold.json``."""
    if config.score_threshold is not None:
        info = {"tau": float(config.score_threshold), "source": "--score_threshold"}
    else:
        info = read_attention_threshold(config.logdir)
    _write_json_atomic(info, config.root / THRESHOLD_JSON)
    _log(f"attention threshold tau = {info['tau']:.6g} ({info['source']})")
    return info["tau"]


# --------------------------------------------------------------------------
# Stage 2: export
# --------------------------------------------------------------------------


def export_stage(config: DemoConfig, tau: float) -> Path:
    """Writes the SavedModel (skipped when a complete one with the same tau exists)."""
    from delg_tf import export as export_entry
    from delg_tf.extraction.config import ExportConfig

    path = config.export_path
    overrides = {"score_threshold": float(tau), "max_feature_num": config.max_feature_num}
    if config.image_scales is not None:
        overrides["image_scales"] = tuple(config.image_scales)
    export = ExportConfig(**overrides)
    stamp = path / "assets.extra" / "demo_export.json"
    wanted = {"checkpoint_step": trained_step(config.logdir), "export": dataclasses.asdict(export)}
    if (path / SAVED_MODEL_FILE).is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)):
            _log(f"export: {path} is up to date, skipped")
            return path
    _log(f"export: SavedModel -> {path}")
    out = export_entry.main(
        export_entry.ExportRunConfig(
            checkpoint_dir=str(config.logdir),
            export_path=str(path),
            export=export,
            overwrite=path.exists(),
        )
    )
    _write_json_atomic(wanted, stamp)
    return out


# --------------------------------------------------------------------------
# Stage 3: extraction
# --------------------------------------------------------------------------


def dataset_paths(config: DemoConfig):
    """The embedded default dataset under ``OUT/data`` (built if missing)."""
    from delg_tf.data import embedded
    from delg_tf.training.data import EMBEDDED_SUBDIR

    return embedded.build_embedded_dataset(
        config.data_dir / f"{EMBEDDED_SUBDIR}-{EMBEDDED_PRESET}", preset=EMBEDDED_PRESET
    )


def _retrieval_dataset(paths, gnd_cfg):
    """The embedded data restricted to `gnd_cfg` (`evaluation_subset`) as a
    `RevisitopDataset`, the input of the evaluation's extraction.
    """
    from delg_tf.data.revisitop import RevisitopDataset

    return RevisitopDataset(
        name="embedded",
        gnd_path=Path(paths.gnd),
        images_dir=paths.jpg_dir,
        imlist=list(gnd_cfg["imlist"]),
        qimlist=list(gnd_cfg["qimlist"]),
        gnd=list(gnd_cfg["gnd"]),
    )


def query_images(config: DemoConfig, paths, gnd_cfg) -> list:
    """(name, image source, resize_factor) of the queries cropped to their bbx (revisitop
    protocol, `delg_tf.evaluation.end_to_end.query_items`, as `delg_tf.evaluate`).

    The embedded queries' bbx is the whole image, so each is its file as is (no
    resize factor); any other bbx is cropped in memory, nothing is written.
    """
    from delg_tf.evaluation.end_to_end import query_items

    return query_items(_retrieval_dataset(paths, gnd_cfg))


def extract_stage(config: DemoConfig, model_path, paths, gnd_cfg) -> dict:
    """Extracts database and query features with the evaluation's extraction
    (`end_to_end.extract_retrieval_stores`: ``delg_tf.extract``, resumable; the model is
    loaded only if something is left to extract).

    Returns:
        ``{"database": store path, "queries": store path}``.
    """
    from delg_tf import extract as extract_entry
    from delg_tf.evaluation.end_to_end import extract_retrieval_stores

    _log(f"extract: {len(gnd_cfg['imlist'])} database images, {len(gnd_cfg['qimlist'])} queries")
    settings = extract_entry.ExtractConfig(
        output_dir=str(config.features_dir), model_path=str(model_path), progress=config.progress
    )
    database, queries, _ = extract_retrieval_stores(
        _retrieval_dataset(paths, gnd_cfg),
        config.features_dir / "database",
        config.features_dir / "queries",
        settings,
    )
    return {"database": database, "queries": queries}


# --------------------------------------------------------------------------
# Stages 4-5: retrieval, re-ranking, evaluation
# --------------------------------------------------------------------------


def evaluate_stage(config: DemoConfig, stores: dict, gnd_cfg, tau: float):
    """Global search, top-k RANSAC and SuperGlobal re-ranking, revisitop metrics.

    ``results["superglobal"]`` is SuperGlobal (MDescAug + RerankwMDA, M = 400,
    K = 9, beta = 0.15) of the same global ranking, beside the RANSAC one
    (``results["reranked"]``); its wall time goes to ``evaluation.timings``
    (``timings.json``), not to the results.

    Returns:
        (FeaturesEvaluation, db LocalFeatures, query LocalFeatures, results dict).
    """
    from delg_tf.evaluation.config import EvaluateConfig
    from delg_tf.evaluation.pipeline import (
        evaluate_features,
        load_store_features,
        superglobal_ranking,
    )
    from delg_tf.evaluation.revisitop import evaluate_revisitop

    db_global, db_local = load_store_features(stores["database"], gnd_cfg["imlist"])
    q_global, q_local = load_store_features(stores["queries"], gnd_cfg["qimlist"])
    eval_config = EvaluateConfig(
        shortlist_size=min(config.shortlist_size, len(db_local)), num_workers=config.num_workers
    )
    progress = progress_wrapper("re-rank", "query", enabled=config.progress)
    _log(
        f"retrieve + re-rank: {len(q_local)} queries x {len(db_local)} database images, "
        f"top-{eval_config.shortlist_size} re-ranked by affine-RANSAC inliers; SuperGlobal "
        f"re-ranks the top {min(eval_config.superglobal_m, len(db_local))}"
    )
    evaluation = evaluate_features(
        db_global,
        q_global,
        gnd_cfg["gnd"],
        db_local,
        q_local,
        eval_config,
        progress=progress,
        verbose=False,
    )
    start = time.perf_counter()
    superglobal = superglobal_ranking(evaluation.global_ranks, db_global, q_global, eval_config)
    evaluation.timings["superglobal_s"] = time.perf_counter() - start
    rows = {
        **evaluation.results,
        "superglobal": evaluate_revisitop(superglobal, gnd_cfg["gnd"], eval_config.kappas),
    }
    results = {}
    for name in ("global", "reranked", "superglobal"):
        per_protocol = rows[name]
        results[name] = {**per_protocol[MEDIUM], **per_protocol}
    results["protocol"] = MEDIUM
    results["units"] = "percent"
    results["attention_threshold"] = tau
    results["local_features_per_image"] = {
        "database_mean": float(np.mean([len(f) for f in db_local])),
        "queries_mean": float(np.mean([len(f) for f in q_local])),
    }
    results["num_queries"] = len(q_local)
    results["num_database"] = len(db_local)
    results["config"] = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in eval_config.record().items()
    }
    return evaluation, db_local, q_local, results


def format_table(results: dict) -> str:
    """Global, RANSAC re-ranked and SuperGlobal (if present) per protocol and metric (%)."""
    metrics = [k for k in results["global"][MEDIUM]]
    columns = [("global", 10), ("reranked", 12)]
    if "superglobal" in results:
        columns.append(("superglobal", 13))
    titles = {"reranked": "re-ranked"}
    lines = [f"{'':<16}" + "".join(f"{titles.get(n, n):>{w}}" for n, w in columns)]
    for protocol in PROTOCOLS:
        for metric in metrics:
            lines.append(
                f"{protocol + ' ' + metric:<16}"
                + "".join(f"{results[n][protocol][metric]:>{w}.2f}" for n, w in columns)
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Stage 6: pictures, and the ground-truth check of the matches
# --------------------------------------------------------------------------


def gt_reprojection_errors(transforms, query_name, db_name, query_xy, db_xy) -> np.ndarray:
    """Distance (px) between matched query keypoints mapped by the true homography and
    their database keypoints.

    Args:
        transforms: ``delg_tf.data.embedded.load_transforms`` content.
        query_name, db_name: image names (no extension) of the same photo.
        query_xy, db_xy: float [M, 2] matched keypoints as **(x, y)**.

    The dataset's homographies use pixel centres at integer coordinates; the
    extractor's keypoints are receptive-field box centres in the same pixel grid
    (no half-pixel shift), so no convention change is needed. A half-pixel
    mismatch would only move the errors by <= 0.71 px anyway.
    """
    from delg_tf.data.homography import apply_homography, homography_between

    h = homography_between(transforms, query_name, db_name)
    mapped = apply_homography(h, np.asarray(query_xy, np.float64).reshape(-1, 2))
    return np.linalg.norm(mapped - np.asarray(db_xy, np.float64).reshape(-1, 2), axis=1)


def same_photo(transforms, name_a, name_b) -> bool:
    images = transforms["images"]
    return (
        name_a in images and name_b in images and images[name_a]["photo"] == images[name_b]["photo"]
    )


def choose_showcase_query(evaluation, gnd) -> int:
    """The query whose medium-protocol AP gained most from re-ranking (ties: the first)."""
    from delg_tf.evaluation.revisitop import compute_map, protocol_gnd

    medium = protocol_gnd(gnd, MEDIUM)
    before = np.nan_to_num(np.asarray(compute_map(evaluation.global_ranks, medium).aps))
    after = np.nan_to_num(np.asarray(compute_map(evaluation.reranked_ranks, medium).aps))
    return int(np.argmax(after - before))


def match_statistics(
    config: DemoConfig, evaluation, q_local, db_local, gnd_cfg, transforms
) -> dict:
    """Inlier reprojection errors under the true homographies for the re-ranked top-1.

    For every query whose re-ranked top-1 shows the same photo, the RANSAC inliers
    are mapped through the known query->database homography.

    Returns:
        ``{"pairs": n, "inliers": n, "median_error_px": .., "fraction_within_px": ..,
        "threshold_px": .., "pair_names": [[query, database], ...]}``.
    """
    from delg_tf.evaluation.config import EvaluateConfig
    from delg_tf.matching.pair import match_pair

    match_config = EvaluateConfig().matching
    errors, names = [], []
    for q, q_name in enumerate(gnd_cfg["qimlist"]):
        d = int(evaluation.reranked_ranks[0, q])
        d_name = gnd_cfg["imlist"][d]
        if not same_photo(transforms, q_name, d_name):
            continue
        pair = match_pair(q_local[q], db_local[d], match_config)
        if pair.num_inliers == 0:
            continue
        inl = pair.inlier_mask
        q_xy = q_local[q].keypoints[pair.query_idx[inl]][:, ::-1]
        d_xy = db_local[d].keypoints[pair.db_idx[inl]][:, ::-1]
        errors.append(gt_reprojection_errors(transforms, q_name, d_name, q_xy, d_xy))
        names.append([q_name, d_name])
    errors = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "pairs": len(names),
        "pair_names": names,
        "inliers": int(errors.size),
        "median_error_px": float(np.median(errors)) if errors.size else None,
        "fraction_within_px": (
            float(np.mean(errors <= GT_REPROJECTION_THRESHOLD_PX)) if errors.size else None
        ),
        "threshold_px": GT_REPROJECTION_THRESHOLD_PX,
    }


def visualize_stage(
    config: DemoConfig, evaluation, q_local, db_local, gnd_cfg, query_pairs, paths
) -> dict:
    """Writes matches.png and ranking_grid.png for the showcase query."""
    from PIL import Image

    from delg_tf.evaluation.config import EvaluateConfig
    from delg_tf.extract import load_image_source
    from delg_tf.matching.pair import match_pair
    from delg_tf.visualization.matches import draw_pair_match
    from delg_tf.visualization.ranking_grid import draw_ranking_grid

    gnd = gnd_cfg["gnd"]
    q = choose_showcase_query(evaluation, gnd)
    query_image = load_image_source(query_pairs[q][1])

    def load_db(db_id):
        return np.asarray(
            Image.open(paths.jpg_dir / f"{gnd_cfg['imlist'][db_id]}.jpg").convert("RGB")
        )

    best = int(evaluation.reranked_ranks[0, q])
    match_config = EvaluateConfig().matching
    pair = match_pair(q_local[q], db_local[best], match_config)
    matches = draw_pair_match(
        query_image, load_db(best), q_local[q], db_local[best], pair, config.root / MATCHES_PNG
    )
    top = evaluation.reranked_ranks[: config.grid_top_k, q]
    inliers = {
        int(d): match_pair(q_local[q], db_local[int(d)], match_config).num_inliers for d in top
    }
    positives = np.concatenate([np.ravel(gnd[q].get("easy", [])), np.ravel(gnd[q].get("hard", []))])
    grid = draw_ranking_grid(
        query_image,
        evaluation.global_ranks[:, q],
        evaluation.reranked_ranks[:, q],
        load_db,
        config.root / GRID_PNG,
        top_k=config.grid_top_k,
        positives=positives,
        junk=np.ravel(gnd[q].get("junk", [])),
        num_inliers=inliers,
    )
    return {
        "query": gnd_cfg["qimlist"][q],
        "best_database_image": gnd_cfg["imlist"][best],
        "inliers": int(pair.num_inliers),
        # Relative to --output_dir: results.json does not depend on where it is.
        "matches_png": os.path.relpath(matches, config.root),
        "grid_png": os.path.relpath(grid, config.root),
    }


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def _write_json_atomic(obj, path) -> Path:
    """The demo's JSON files: sorted keys, indent 2, a final newline; written atomically
    (disk full: no partial JSON is left behind).
    """
    return atomic.write_json_atomic(
        obj, path, indent=2, sort_keys=True, default=_json_default, end="\n", parents=True
    )


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(config: DemoConfig) -> Path:
    """Runs the six stages; returns the path of ``results.json``."""
    from delg_tf.data.embedded import load_transforms
    from delg_tf.data.revisitop import load_gnd

    timings = {}
    started = time.perf_counter()

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - start, 2)
        _log(f"{name}: {timings[name]:.1f} s")
        return out

    # Bad flagfile/flags: fail before anything is written.
    train_landmarks = trained_landmarks(train_configs(config)[0])
    config.root.mkdir(parents=True, exist_ok=True)
    paths = timed("data", dataset_paths, config)
    timed("train", train_stage, config)
    tau = attention_threshold_stage(config)
    model_path = timed("export", export_stage, config, tau)
    transforms = load_transforms(paths)
    gnd_cfg = evaluation_subset(train_landmarks, load_gnd(paths.gnd, require_bbx=False), transforms)
    stores = timed("extract", extract_stage, config, model_path, paths, gnd_cfg)
    evaluation, db_local, q_local, results = timed(
        "retrieve_rerank_evaluate", evaluate_stage, config, stores, gnd_cfg, tau
    )
    results["train_landmarks"] = train_landmarks
    results["queries"] = list(gnd_cfg["qimlist"])
    results["ground_truth_check"] = match_statistics(
        config, evaluation, q_local, db_local, gnd_cfg, transforms
    )
    query_pairs = query_images(config, paths, gnd_cfg)
    results["pictures"] = timed(
        "visualize",
        visualize_stage,
        config,
        evaluation,
        q_local,
        db_local,
        gnd_cfg,
        query_pairs,
        paths,
    )
    timings["total"] = round(time.perf_counter() - started, 2)
    out = _write_json_atomic(results, config.root / RESULTS_JSON)
    _write_json_atomic(
        {"stage_seconds": timings, "evaluation_seconds": evaluation.timings},
        config.root / TIMINGS_JSON,
    )
    check = results["ground_truth_check"]
    print()
    landmarks = {transforms["images"][q]["landmark_id"] for q in gnd_cfg["qimlist"]}
    unseen = f" of the {len(landmarks)} landmarks not used for training" if train_landmarks else ""
    print(
        f"DELG demo: {results['num_queries']} queries{unseen}, {results['num_database']} "
        f"database images, tau = {tau:.6g} (trained attention median), "
        f"{results['local_features_per_image']['database_mean']:.0f} local features "
        "per database image on average"
    )
    print(format_table(results))
    print(
        f"medium mAP: global {results['global']['mAP']:.2f} -> re-ranked "
        f"{results['reranked']['mAP']:.2f}"
    )
    print(
        f"SuperGlobal (global descriptors only, top "
        f"{min(results['config']['superglobal_m'], results['num_database'])}): medium mAP "
        f"{results['superglobal']['mAP']:.2f}"
    )
    if check["inliers"]:
        print(
            f"ground truth: {check['inliers']} RANSAC inliers of {check['pairs']} correct "
            f"top-1 pairs, median error under the known homography "
            f"{check['median_error_px']:.1f} px, {100 * check['fraction_within_px']:.0f}% "
            f"within {check['threshold_px']:.0f} px"
        )
    print(f"stage seconds: {timings}")
    print(
        f"wrote {out}, {config.root / TIMINGS_JSON}, "
        f"{config.root / results['pictures']['matches_png']}, "
        f"{config.root / results['pictures']['grid_png']}"
    )
    return out


def _define_flags():
    from absl import flags

    d = DemoConfig()
    flags.DEFINE_string("output_dir", d.output_dir, "Folder for every demo output.")
    flags.DEFINE_string("train_flagfile", d.flagfile, "Training flagfile of the demo.")
    flags.DEFINE_list(
        "train_flags",
        [],
        "Extra training flags, e.g. --train_flags=--max_iters=200 (applied after the flagfile).",
    )
    flags.DEFINE_float(
        "score_threshold",
        None,
        "Attention threshold tau (default: the "
        "trained run's final attention median, as in the paper).",
    )
    flags.DEFINE_list(
        "image_scales", None, "Local pyramid scales of the export (default 0.25 ... 2.0, 7 scales)."
    )
    flags.DEFINE_integer("max_feature_num", d.max_feature_num, "Local features per image.")
    flags.DEFINE_integer(
        "train_landmarks",
        d.train_landmarks,
        "Train on the embedded "
        "landmarks with id < this, evaluate the others' queries (0 = all; "
        "default: the flagfile's --embedded_train_landmarks).",
    )
    flags.DEFINE_integer(
        "shortlist_size",
        d.shortlist_size,
        "Top-k re-ranked (paper: 100 of ~5k images; the demo database has 86).",
    )
    flags.DEFINE_integer("grid_top_k", d.grid_top_k, "Results per row of ranking_grid.png.")
    flags.DEFINE_integer("num_workers", d.num_workers, "Re-ranking threads.")
    flags.DEFINE_boolean("progress", d.progress, "Show progress bars.")
    return flags.FLAGS


def _config_from_flags(f) -> DemoConfig:
    try:
        scales = None if f.image_scales is None else tuple(float(s) for s in f.image_scales)
    except ValueError as e:
        raise ConfigError(
            f"--image_scales must be comma-separated floats; received {f.image_scales}.",
            "image_scales",
        ) from e
    train_flags = tuple(s if s.startswith("--") else f"--{s}" for s in f.train_flags)
    return DemoConfig(
        output_dir=f.output_dir,
        flagfile=f.train_flagfile,
        train_flags=train_flags,
        score_threshold=f.score_threshold,
        image_scales=scales,
        max_feature_num=f.max_feature_num,
        train_landmarks=f.train_landmarks,
        shortlist_size=f.shortlist_size,
        grid_top_k=f.grid_top_k,
        num_workers=f.num_workers,
        progress=f.progress,
    )


def _describe_run_error(error) -> str:
    return (
        f"{error}; free space or fix permissions under the output folder and rerun "
        "(finished stages are kept)."
    )


def cli():
    """Console entry point."""
    from delg_tf import cli as runner
    from delg_tf.data.errors import DataError

    usage_errors = (
        DemoError,
        DataError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        ImportError,
    )
    runner.run_config_main(
        _define_flags,
        _config_from_flags,
        main,
        expected_errors=[
            runner.ErrorRule(usage_errors, EXIT_USAGE_ERROR),
            runner.ErrorRule((OSError,), EXIT_RUN_ERROR, _describe_run_error),
        ],
    )


if __name__ == "__main__":
    cli()
