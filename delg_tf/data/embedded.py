"""The embedded default dataset: real photos, synthetic views, known geometry.

Built at run time from photographs that ship inside scikit-image
(`skimage.data`), so the package trains, extracts and evaluates on a fresh
machine without any download. Each photograph is one class ("landmark"); many
views of it are made with random homographies (crop, scale, rotation,
perspective) and lighting changes (brightness, contrast, gamma, colour gain,
noise). The exact 3x3 homography from the (canonical) source photo to every
view is recorded, so later stages can use it as ground truth for matching
(DELG, Cao et al. ECCV 2020, sec. 4: local features are verified with RANSAC
homographies/affinities).

Coordinates: x = column, y = row, pixel centres at integer coordinates (the
scikit-image convention). A homography H maps homogeneous source points
[x, y, 1] to view points. The homography maths (`apply_homography`,
`homography_between`, `shift_homography_convention` for COLMAP's convention,
view sampling) lives in `delg_tf.data.homography`; warping and lighting of the
views in `delg_tf.data.embedded_render`; this module plans, renders and
writes the dataset and loads its files.

On-disk layout under `root` (see `EmbeddedDatasetPaths`)::

    manifest.json            parameters + counts; written last (= complete)
    sources/<photo>.jpg      canonical source photos (homography origin)
    train/train.csv          GLDv2-style: id,url,landmark_id (url empty)
    train/images/<id>.jpg    training views (flat, like build_image_dataset)
    retrieval/jpg/<name>.jpg query and database views
    retrieval/gnd_embedded.pkl   revisitop-style ground truth
    transforms.json          per image: photo, landmark, homography, crop...

Ground truth (`gnd_embedded.pkl`, same structure as revisitop's
`gnd_roxford5k.pkl`): dict with `imlist` (database names, no extension),
`qimlist` (query names) and `gnd`, one dict per query with `bbx` =
[x1, y1, x2, y2] (the full query image, [0, 0, width, height]) and `easy`,
`hard`, `junk` (np.int64 arrays of database indices). With `coverage` the
fraction of the query's footprint on the source photo that a database view
also shows (footprints are rasterised on the source at 1/4 resolution):

* easy: view made with the mild "easy" profile (50-90% of the photo, <= 8 deg
  rotation, <= 8% corner perspective jitter, mild lighting), coverage >=
  `JUNK_MAX_COVERAGE`;
* hard: view made with the "hard" profile (zoom to 20-45% of the photo, i.e. a
  1.5-2x scale change, <= 25 deg rotation, <= 20% corner jitter, strong
  lighting and gamma), coverage >= `JUNK_MAX_COVERAGE`;
* junk: any view of the query's landmark with coverage < `JUNK_MAX_COVERAGE`
  (little overlap, like revisitop's "less than 25% of the object visible";
  includes the "junk" profile's heavy crops of 2-6% of the photo);
* every other database image (other landmarks, distractor photos that are
  not landmarks) is a negative.

This module does not import TensorFlow.
"""

import dataclasses
import json
import logging
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image

from delg_tf import atomic
from delg_tf.data.embedded_render import apply_photometric, sample_photometric, warp_view
from delg_tf.data.errors import DataError
from delg_tf.data.homography import sample_view_geometry

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Photos used as landmarks, in class-id order, then photos used only as
# distractors in the database. Keys are the names used everywhere (files,
# CSV ids, transforms.json); values the skimage.data loader and an index into
# a tuple result (stereo_motorcycle returns left, right, disparity).
LANDMARK_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "motorcycle_left",
    "retina",
)
DISTRACTOR_PHOTOS = ("clock", "moon", "page", "brick", "gravel", "grass", "text", "colorwheel")
ALL_PHOTOS = LANDMARK_PHOTOS + DISTRACTOR_PHOTOS
_SKIMAGE_LOADERS = {"motorcycle_left": ("stereo_motorcycle", 0)}

# Fraction of a query's footprint a database view must show to count as a
# positive (easy/hard); below it, a view of the same landmark is junk.
JUNK_MAX_COVERAGE = 0.15
# Footprints are rasterised on the source photo at this stride (pixels).
COVERAGE_GRID_STRIDE = 4
_ROLE_CODES = {"train": 0, "query": 1, "database": 2, "distractor": 3}

MANIFEST_NAME = "manifest.json"
TRANSFORMS_NAME = "transforms.json"
GND_NAME = "gnd_embedded.pkl"
TRAIN_CSV_HEADER = ("id", "url", "landmark_id")


@dataclasses.dataclass(frozen=True)
class ViewProfile:
    """Random ranges for one kind of view.

    Attributes:
        area_range: fraction of the photo's area the base crop covers.
        aspect_log_range: max |log(aspect change)| of the crop vs. the photo.
        max_rotation_deg: in-plane rotation range (+-).
        perspective: max corner jitter as a fraction of the crop's sides.
        output_scale_range: long side of the view / `image_size`.
        brightness: max additive brightness change (+-, in [0, 1] units).
        contrast_range: multiplicative contrast about the mean.
        gamma_range: gamma exponent applied to [0, 1] intensities.
        color_gain: max per-channel gain change (+-).
        noise_std: std of additive Gaussian noise (in [0, 1] units).
    """

    area_range: tuple
    aspect_log_range: float
    max_rotation_deg: float
    perspective: float
    output_scale_range: tuple
    brightness: float
    contrast_range: tuple
    gamma_range: tuple
    color_gain: float
    noise_std: float


_MILD_LIGHT = dict(
    brightness=0.05,
    contrast_range=(0.9, 1.1),
    gamma_range=(0.9, 1.1),
    color_gain=0.03,
    noise_std=0.0,
)
_STRONG_LIGHT = dict(
    brightness=0.15,
    contrast_range=(0.6, 1.3),
    gamma_range=(0.6, 1.6),
    color_gain=0.1,
    noise_std=0.02,
)
PROFILES = {
    "query": ViewProfile((0.55, 0.85), 0.15, 5.0, 0.05, (1.0, 1.0), **_MILD_LIGHT),
    "easy": ViewProfile((0.5, 0.9), 0.2, 8.0, 0.08, (0.8, 1.0), **_MILD_LIGHT),
    "hard": ViewProfile((0.2, 0.45), 0.3, 25.0, 0.2, (0.8, 1.0), **_STRONG_LIGHT),
    "junk": ViewProfile((0.02, 0.06), 0.3, 10.0, 0.05, (0.8, 1.0), **_MILD_LIGHT),
    "train": ViewProfile((0.15, 1.0), 0.3, 20.0, 0.15, (0.8, 1.0), **_STRONG_LIGHT),
    "distractor": ViewProfile((0.4, 0.9), 0.2, 10.0, 0.1, (0.8, 1.0), **_MILD_LIGHT),
}

PRESETS = {
    # Demo-sized: ~520 images, built in well under a minute on one CPU core.
    "default": dict(
        seed=0,
        image_size=320,
        source_size=640,
        num_landmarks=10,
        num_train_views=40,
        num_queries=2,
        num_easy=3,
        num_hard=3,
        num_junk=1,
        num_distractor_photos=8,
        num_views_per_distractor=2,
        jpeg_quality=90,
    ),
    # For tests: a couple of seconds.
    "tiny": dict(
        seed=0,
        image_size=96,
        source_size=160,
        num_landmarks=4,
        num_train_views=5,
        num_queries=1,
        num_easy=1,
        num_hard=1,
        num_junk=1,
        num_distractor_photos=2,
        num_views_per_distractor=1,
        jpeg_quality=90,
    ),
}
# For evaluations where a few points of mAP must not be noise (bench/rerank_quality.py):
# the default preset's photos, sizes, training and landmark database views, with 10
# queries per landmark and 42 views per distractor photo (406 database images, so that
# SuperGlobal's top 400 is a real shortlist). Images are seeded one by one
# (`_image_rng`), so the default preset's queries and distractors are among them, pixel
# for pixel, and its files do not change.
EVAL_QUERIES_PER_LANDMARK = 10
EVAL_VIEWS_PER_DISTRACTOR = 42
PRESETS["eval"] = dict(
    PRESETS["default"],
    num_queries=EVAL_QUERIES_PER_LANDMARK,
    num_views_per_distractor=EVAL_VIEWS_PER_DISTRACTOR,
)


@dataclasses.dataclass(frozen=True)
class EmbeddedDatasetPaths:
    """Paths of a built embedded dataset (all absolute).

    Attributes:
        root: dataset folder.
        manifest: manifest.json (parameters and counts).
        train_csv: GLDv2-style train.csv (id,url,landmark_id).
        train_images_dir: folder of <id>.jpg training views.
        retrieval_dir: Revisited-Oxford-style folder (jpg/ + gnd pickle).
        jpg_dir: folder of <name>.jpg query and database views.
        gnd: gnd_embedded.pkl.
        transforms: transforms.json (per-image geometry).
        sources_dir: canonical source photos <photo>.jpg.
    """

    root: Path
    manifest: Path
    train_csv: Path
    train_images_dir: Path
    retrieval_dir: Path
    jpg_dir: Path
    gnd: Path
    transforms: Path
    sources_dir: Path

    @classmethod
    def at(cls, root):
        """The paths of a dataset rooted at `root` (nothing is checked)."""
        root = Path(root).absolute()
        retrieval = root / "retrieval"
        return cls(
            root=root,
            manifest=root / MANIFEST_NAME,
            train_csv=root / "train" / "train.csv",
            train_images_dir=root / "train" / "images",
            retrieval_dir=retrieval,
            jpg_dir=retrieval / "jpg",
            gnd=retrieval / GND_NAME,
            transforms=root / TRANSFORMS_NAME,
            sources_dir=root / "sources",
        )


# --------------------------------------------------------------------------
# Source photos
# --------------------------------------------------------------------------


def load_source_photo(photo, source_size):
    """Loads a scikit-image photo as RGB with long side <= `source_size`.

    The photo is downscaled (Lanczos) when its long side exceeds
    `source_size`, never upscaled. Grayscale photos are replicated to RGB.

    Args:
        photo: one of `ALL_PHOTOS`.
        source_size: maximal long side of the canonical source.

    Returns:
        (uint8 [H, W, 3] canonical source, (orig_height, orig_width)).
    """
    import skimage.data

    loader, index = _SKIMAGE_LOADERS.get(photo, (photo, None))
    try:
        image = getattr(skimage.data, loader)()
    except Exception as e:  # skimage raises various errors for missing data.
        raise DataError(
            f"cannot load skimage.data.{loader}() for the embedded dataset "
            f"({type(e).__name__}: {e}); reinstall scikit-image"
        ) from e
    if index is not None:
        image = image[index]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(
            np.clip(image.astype(np.float64), 0, 1) * 255 if image.max() <= 1 else image
        ).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    orig_shape = image.shape[:2]
    long_side = max(orig_shape)
    if long_side > source_size:
        scale = source_size / long_side
        new_size = (
            max(1, int(round(orig_shape[1] * scale))),
            max(1, int(round(orig_shape[0] * scale))),
        )
        image = np.asarray(Image.fromarray(image).resize(new_size, Image.LANCZOS))
    return np.ascontiguousarray(image), orig_shape


# --------------------------------------------------------------------------
# Plan: which images exist (pure; no pixels)
# --------------------------------------------------------------------------


def _resolve_params(preset, overrides):
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    params = dict(PRESETS[preset])
    for key, value in overrides.items():
        if key not in params:
            raise TypeError(
                f"unknown embedded dataset parameter {key!r}; expected one of {sorted(params)}"
            )
        if value is not None:
            params[key] = value
    if not 1 <= params["num_landmarks"] <= len(LANDMARK_PHOTOS):
        raise ValueError(
            f"num_landmarks must be in [1, {len(LANDMARK_PHOTOS)}], got {params['num_landmarks']}"
        )
    if not 0 <= params["num_distractor_photos"] <= len(DISTRACTOR_PHOTOS):
        raise ValueError(
            f"num_distractor_photos must be in [0, "
            f"{len(DISTRACTOR_PHOTOS)}], got "
            f"{params['num_distractor_photos']}"
        )
    if params["num_queries"] < 1 or params["num_easy"] < 1:
        raise ValueError("num_queries and num_easy must be >= 1 so that every query has a positive")
    return params


def plan_images(params):
    """Lists every image to make, without rendering it.

    Args:
        params: resolved parameters (see PRESETS).

    Returns:
        list of dicts with `name`, `split` (train/query/database), `photo`,
        `landmark_id` (int, or None for distractors), `profile`, `role`, `k`.
    """
    plan = []
    landmarks = LANDMARK_PHOTOS[: params["num_landmarks"]]
    for label, photo in enumerate(landmarks):
        for k in range(params["num_train_views"]):
            plan.append(
                dict(
                    name=f"{photo}_t{k:04d}",
                    split="train",
                    photo=photo,
                    landmark_id=label,
                    profile="train",
                    role="train",
                    k=k,
                )
            )
    for label, photo in enumerate(landmarks):
        for k in range(params["num_queries"]):
            plan.append(
                dict(
                    name=f"query_{photo}_{k:02d}",
                    split="query",
                    photo=photo,
                    landmark_id=label,
                    profile="query",
                    role="query",
                    k=k,
                )
            )
    for label, photo in enumerate(landmarks):
        offset = 0
        for profile in ("easy", "hard", "junk"):
            for k in range(params[f"num_{profile}"]):
                plan.append(
                    dict(
                        name=f"db_{photo}_{profile}_{k:02d}",
                        split="database",
                        photo=photo,
                        landmark_id=label,
                        profile=profile,
                        role="database",
                        k=offset + k,
                    )
                )
            offset += params[f"num_{profile}"]
    for photo in DISTRACTOR_PHOTOS[: params["num_distractor_photos"]]:
        for k in range(params["num_views_per_distractor"]):
            plan.append(
                dict(
                    name=f"db_distractor_{photo}_{k:02d}",
                    split="database",
                    photo=photo,
                    landmark_id=None,
                    profile="distractor",
                    role="distractor",
                    k=k,
                )
            )
    return plan


def _image_rng(seed, item):
    """Per-image Generator: independent of generation order and subsets."""
    entropy = [
        int(seed),
        ALL_PHOTOS.index(item["photo"]),
        _ROLE_CODES[item["role"]],
        int(item["k"]),
    ]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def render_image(item, source, params):
    """Renders one planned image.

    Args:
        item: a dict from `plan_images`.
        source: uint8 canonical source photo of `item["photo"]`.
        params: resolved parameters.

    Returns:
        (uint8 [h, w, 3] view, metadata dict for transforms.json).
    """
    rng = _image_rng(params["seed"], item)
    profile = PROFILES[item["profile"]]
    geometry = sample_view_geometry(rng, profile, source.shape[:2], params["image_size"])
    photometric = sample_photometric(rng, profile)
    view = apply_photometric(
        warp_view(source, geometry["homography"], geometry["output_size"]), photometric
    )
    meta = {
        "split": item["split"],
        "photo": item["photo"],
        "landmark_id": item["landmark_id"],
        "profile": item["profile"],
        "width": geometry["output_size"][0],
        "height": geometry["output_size"][1],
        "homography_source_to_view": geometry["homography"].tolist(),
        "crop_quad_in_source": geometry["quad"].tolist(),
        "area_fraction": geometry["area_fraction"],
        "rotation_deg": geometry["rotation_deg"],
        "photometric": photometric,
    }
    return view, meta


# --------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------


def footprint_mask(quad, source_shape, stride=COVERAGE_GRID_STRIDE):
    """Rasterises a view's footprint (its quad on the source) on a grid.

    Returns:
        bool [ceil(H / stride), ceil(W / stride)].
    """
    from skimage.draw import polygon

    height, width = source_shape
    shape = (-(-height // stride), -(-width // stride))
    quad = np.asarray(quad, np.float64) / stride
    mask = np.zeros(shape, bool)
    rows, cols = polygon(quad[:, 1], quad[:, 0], shape)
    mask[rows, cols] = True
    return mask


def build_ground_truth(images_meta, sources_meta, query_names, db_names):
    """Revisitop-style easy/hard/junk lists for every query.

    Args:
        images_meta: name -> metadata (transforms.json "images").
        sources_meta: photo -> metadata (transforms.json "sources").
        query_names: list of query names.
        db_names: list of database names (index order of the lists).

    Returns:
        list (one per query) of dicts with `bbx`, `easy`, `hard`, `junk`.
    """
    masks = {}

    def mask_of(name):
        if name not in masks:
            meta = images_meta[name]
            shape = sources_meta[meta["photo"]]["shape"]
            masks[name] = footprint_mask(meta["crop_quad_in_source"], shape)
        return masks[name]

    gnd = []
    for query in query_names:
        q_meta = images_meta[query]
        q_mask = mask_of(query)
        lists = {"easy": [], "hard": [], "junk": []}
        for index, name in enumerate(db_names):
            meta = images_meta[name]
            if meta["landmark_id"] != q_meta["landmark_id"] or (meta["landmark_id"] is None):
                continue
            coverage = np.logical_and(q_mask, mask_of(name)).sum() / max(q_mask.sum(), 1)
            if coverage < JUNK_MAX_COVERAGE:
                lists["junk"].append(index)
            elif meta["profile"] == "easy":
                lists["easy"].append(index)
            else:
                lists["hard"].append(index)
        if not lists["easy"] and not lists["hard"]:
            raise DataError(
                f"embedded dataset: query {query} has no positive "
                "database image; use more easy views (num_easy)"
            )
        entry = {"bbx": np.array([0.0, 0.0, float(q_meta["width"]), float(q_meta["height"])])}
        entry.update({k: np.array(v, np.int64) for k, v in lists.items()})
        gnd.append(entry)
    return gnd


# --------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------


def load_transforms(paths_or_root):
    """Loads transforms.json of a built dataset.

    Args:
        paths_or_root: EmbeddedDatasetPaths or the dataset root.

    Returns:
        dict with `convention`, `sources` and `images` (name -> metadata).
    """
    paths = (
        paths_or_root
        if isinstance(paths_or_root, EmbeddedDatasetPaths)
        else EmbeddedDatasetPaths.at(paths_or_root)
    )
    if not paths.transforms.is_file():
        raise DataError(
            f"{paths.transforms} not found: build the dataset "
            "first with build_embedded_dataset(root)"
        )
    with open(paths.transforms, encoding="utf-8") as f:
        return json.load(f)


def load_ground_truth(paths_or_root):
    """Loads gnd_embedded.pkl (revisitop structure) of a built dataset."""
    paths = (
        paths_or_root
        if isinstance(paths_or_root, EmbeddedDatasetPaths)
        else EmbeddedDatasetPaths.at(paths_or_root)
    )
    if not paths.gnd.is_file():
        raise DataError(
            f"{paths.gnd} not found: build the dataset first with build_embedded_dataset(root)"
        )
    with open(paths.gnd, "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------

ROOT_ENV_VAR = "DELG_TF_DATA_DIR"
_DEFAULT_CACHE = os.path.join("~", ".cache", "delg_tf")
_PARAMS_HASH_CHARS = 10


def default_root(preset="default", **overrides):
    """A cache folder for a dataset with these parameters.

    `$DELG_TF_DATA_DIR` (default ~/.cache/delg_tf) /
    `embedded-<preset>-<hash of the parameters>`, so different parameters
    never collide and the same ones are reused across runs.

    Returns:
        Path (not created).
    """
    import hashlib

    params = _resolve_params(preset, overrides)
    digest = hashlib.sha256(
        json.dumps([FORMAT_VERSION, params], sort_keys=True).encode()
    ).hexdigest()
    base = os.path.expanduser(os.environ.get(ROOT_ENV_VAR) or _DEFAULT_CACHE)
    return Path(base) / f"embedded-{preset}-{digest[:_PARAMS_HASH_CHARS]}"


def _save_jpeg(array, path, quality):
    Image.fromarray(array).save(path, format="JPEG", quality=quality)


def _read_manifest(paths):
    try:
        with open(paths.manifest, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(paths, params):
    manifest = _read_manifest(paths)
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("params") == params
    )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temp_dirs(root):
    """Removes <root>.tmp-<host>-<pid> folders of dead builds on this host."""
    prefix = f"{root.name}.tmp-{socket.gethostname()}-"
    for candidate in root.parent.glob(f"{root.name}.tmp-*"):
        pid = candidate.name[len(prefix) :]
        if not candidate.name.startswith(prefix) or not pid.isdigit():
            continue
        if not _pid_alive(int(pid)):
            logger.info("removing stale partial build %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def _render_all(tmp_paths, params):
    """Renders every image into `tmp_paths`; returns (meta, counts, gnd)."""
    plan = plan_images(params)
    photos = sorted({item["photo"] for item in plan}, key=ALL_PHOTOS.index)
    sources, sources_meta = {}, {}
    for photo in photos:
        source, orig_shape = load_source_photo(photo, params["source_size"])
        sources[photo] = source
        scale = source.shape[1] / orig_shape[1]
        sources_meta[photo] = {
            "shape": list(source.shape[:2]),
            "original_shape": list(orig_shape),
            "is_landmark": photo in LANDMARK_PHOTOS,
            "skimage": ".".join(str(v) for v in _SKIMAGE_LOADERS.get(photo, (photo,))),
            # Pixel-centre convention: x_src = (x_orig + 0.5) * s - 0.5.
            "homography_original_to_source": [
                [scale, 0.0, 0.5 * scale - 0.5],
                [0.0, source.shape[0] / orig_shape[0], 0.5 * source.shape[0] / orig_shape[0] - 0.5],
                [0.0, 0.0, 1.0],
            ],
        }
        _save_jpeg(source, tmp_paths.sources_dir / f"{photo}.jpg", 95)

    images_meta = {}
    started = time.time()
    log_every = max(1, len(plan) // 10)
    for count, item in enumerate(plan, 1):
        view, meta = render_image(item, sources[item["photo"]], params)
        folder = tmp_paths.train_images_dir if item["split"] == "train" else tmp_paths.jpg_dir
        _save_jpeg(view, folder / f"{item['name']}.jpg", params["jpeg_quality"])
        images_meta[item["name"]] = meta
        if count % log_every == 0 or count == len(plan):
            logger.info(
                "embedded dataset: %d/%d images (%.1f s)", count, len(plan), time.time() - started
            )

    train = [i for i in plan if i["split"] == "train"]
    with open(tmp_paths.train_csv, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(TRAIN_CSV_HEADER) + "\n")
        for item in train:
            f.write(f"{item['name']},,{item['landmark_id']}\n")

    query_names = [i["name"] for i in plan if i["split"] == "query"]
    db_names = [i["name"] for i in plan if i["split"] == "database"]
    gnd = build_ground_truth(images_meta, sources_meta, query_names, db_names)
    with open(tmp_paths.gnd, "wb") as f:
        pickle.dump({"imlist": db_names, "qimlist": query_names, "gnd": gnd}, f, protocol=4)
    meta = {
        "convention": (
            "x = column, y = row, pixel centres at integers; "
            "homographies map homogeneous source points to view "
            "points; homography_between(meta, a, b) = "
            "H_b inv(H_a)"
        ),
        "sources": sources_meta,
        "images": images_meta,
    }
    atomic.write_json_atomic(meta, tmp_paths.transforms, indent=1, sort_keys=True)
    counts = {
        "train": len(train),
        "query": len(query_names),
        "database": len(db_names),
        "landmarks": params["num_landmarks"],
        "easy": int(sum(len(g["easy"]) for g in gnd)),
        "hard": int(sum(len(g["hard"]) for g in gnd)),
        "junk": int(sum(len(g["junk"]) for g in gnd)),
    }
    return counts


def build_embedded_dataset(
    root=None,
    preset="default",
    seed=None,
    image_size=None,
    source_size=None,
    num_landmarks=None,
    num_train_views=None,
    num_queries=None,
    num_easy=None,
    num_hard=None,
    num_junk=None,
    num_distractor_photos=None,
    num_views_per_distractor=None,
    jpeg_quality=None,
):
    """Builds (or finds already built) the embedded dataset under `root`.

    Idempotent: if `root/manifest.json` exists with the same parameters the
    dataset is returned as is. The build happens in a sibling temporary folder
    renamed to `root` at the end, so a killed build never leaves a dataset
    that looks complete; its leftovers are removed by the next run. A rebuild
    is deterministic (per-image seeds), so "resuming" means rebuilding.

    Args:
        root: dataset folder (created); None = `default_root(preset, ...)`
            (under $DELG_TF_DATA_DIR or ~/.cache/delg_tf).
        preset: "default" (demo-sized), "tiny" (tests) or "eval" (the default one
            with 10 queries per landmark and 336 distractors); the other arguments
            override the preset when not None.
        seed: int seed; same seed and parameters give identical files.
        image_size: long side of query/database/train views in pixels.
        source_size: max long side of the canonical source photos.
        num_landmarks: number of landmark photos (classes), <= 10.
        num_train_views: training views per landmark.
        num_queries: queries per landmark.
        num_easy, num_hard, num_junk: database views per landmark and profile.
        num_distractor_photos: photos used only as database distractors, <= 8.
        num_views_per_distractor: database views per distractor photo.
        jpeg_quality: JPEG quality of the written views.

    Returns:
        EmbeddedDatasetPaths.

    Raises:
        DataError: `root` exists with other parameters or is not a dataset.
    """
    overrides = dict(
        seed=seed,
        image_size=image_size,
        source_size=source_size,
        num_landmarks=num_landmarks,
        num_train_views=num_train_views,
        num_queries=num_queries,
        num_easy=num_easy,
        num_hard=num_hard,
        num_junk=num_junk,
        num_distractor_photos=num_distractor_photos,
        num_views_per_distractor=num_views_per_distractor,
        jpeg_quality=jpeg_quality,
    )
    params = _resolve_params(preset, overrides)
    if root is None:
        root = default_root(preset, **overrides)
    paths = EmbeddedDatasetPaths.at(root)
    root = paths.root
    if _is_complete(paths, params):
        logger.info("embedded dataset already built at %s", root)
        return paths
    if root.exists():
        manifest = _read_manifest(paths)
        if manifest is None:
            raise DataError(
                f"{root} exists but is not a complete embedded dataset (no "
                f"{MANIFEST_NAME}); remove it or choose another root"
            )
        raise DataError(
            f"{root} holds an embedded dataset built with other parameters "
            f"({manifest.get('params')}, requested {params}); remove it or "
            "choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temp_dirs(root)
    tmp_root = root.parent / (f"{root.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_paths = EmbeddedDatasetPaths.at(tmp_root)
    for folder in (tmp_paths.sources_dir, tmp_paths.train_images_dir, tmp_paths.jpg_dir):
        folder.mkdir(parents=True)
    logger.info("building the embedded dataset at %s (%s)", root, params)
    try:
        counts = _render_all(tmp_paths, params)
        atomic.write_json_atomic(
            {"format_version": FORMAT_VERSION, "params": params, "counts": counts},
            tmp_paths.manifest,
            indent=1,
            sort_keys=True,
        )
        try:
            os.rename(tmp_root, root)
        except OSError:
            # Another process finished the same build first.
            if not _is_complete(paths, params):
                raise
            logger.info("embedded dataset built concurrently at %s", root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    logger.info("embedded dataset ready at %s: %s", root, counts)
    return paths
