"""The extraction contract: `ExportConfig`, the official defaults and DelfConfig reading.

One place for what every DELG extraction path agrees on -- the in-graph pyramid
(`pyramid`), the host-side extractor (`extractor`), and the rooms above
extraction that import it: the SavedModel export (serving) and the official-model
converter (official):

* the official default values (tensorflow/models research/delf
  `r50delg_gld_config.pbtxt`, paper Sec. 4.1) and the extraction modes
  (`local_and_global`, `local`, `global`);
* `ExportConfig`: the validated extraction parameters baked into an export, and
  their equivalent official DelfConfig proto;
* DelfConfig reading: `load_delf_config` (proto, `.pbtxt` path or pbtxt text),
  `read_export_config` (the config asset `assets.extra/delf_config.pbtxt` of a
  delg_tf export) and `saved_model_delf_config` (that asset, else the official
  defaults);
* the SuperGlobal extraction options (Shao et al., ICCV 2023) baked into an export
  (`ExportConfig.superglobal`, `canonical_superglobal`) and the reading of their
  asset `assets.extra/delg_tf_superglobal.json` (`read_superglobal_asset`; written
  by the export with `delg_tf.extraction.superglobal.superglobal_asset`), which the
  official DelfConfig has no field for.

No TensorFlow import.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Tuple

from google.protobuf import text_format

from delg_tf.configs import ConfigError, expect, expect_choice
from delg_tf.protos import delf_config_pb2

# Official r50delg_gld_config.pbtxt values (paper Sec. 4.1); score threshold of the
# released trained models.
DEFAULT_IMAGE_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
DEFAULT_GLOBAL_SCALES_IND = (3, 4, 5)
DEFAULT_MAX_FEATURE_NUM = 1000
DEFAULT_IOU_THRESHOLD = 1.0
DEFAULT_SCORE_THRESHOLD = 175.0
DEFAULT_MAX_IMAGE_SIZE = 1024
NO_SIZE_LIMIT = -1
# Official `_MIN_HEIGHT` / `_MIN_WIDTH`: no features below this side after resizing.
MIN_EXTRACTION_SIDE = 10

MODES = ("local_and_global", "local", "global")
LOCAL_MODES = ("local_and_global", "local")
GLOBAL_MODES = ("local_and_global", "global")

# A SavedModel's extra assets folder (TF Serving convention) and the DelfConfig in it.
ASSETS_EXTRA_DIR = "assets.extra"
CONFIG_ASSET = "delf_config.pbtxt"
MODEL_PATH_PLACEHOLDER = "MODEL_PATH"
# Names ending like this are DelfConfig files, never inline pbtxt text.
CONFIG_FILE_SUFFIXES = (".pbtxt", ".txt", ".prototxt", ".config", ".cfg")

# SuperGlobal modules (Shao et al., "Global Features are All You Need for Image
# Retrieval and Reranking", ICCV 2023), in their canonical order; see
# `delg_tf.extraction.superglobal` for what each computes and where.
GEM_PLUS = "gem_plus"
REGIONAL_GEM = "regional_gem"
SCALE_GEM = "scale_gem"
RELU_PLUS = "relu_plus"
SUPERGLOBAL_MODULES = (GEM_PLUS, REGIONAL_GEM, SCALE_GEM, RELU_PLUS)
SUPERGLOBAL_ALL = "all"  # --superglobal=all: every module.
# The asset recording them in an export (the official DelfConfig has no field for them).
SUPERGLOBAL_ASSET = "delg_tf_superglobal.json"
SUPERGLOBAL_ASSET_MODULES_KEY = "modules"
# The host-side aggregation of the per-scale global descriptors (after per-scale L2):
# the official sum, or Scale-GeM's element-wise max.
AGGREGATION_SUM = "sum"
AGGREGATION_MAX = "max"


def mode_uses_local(mode):
    """True if `mode` (one of `MODES`) has local features."""
    return mode in LOCAL_MODES


def mode_uses_global(mode):
    """True if `mode` (one of `MODES`) has a global descriptor."""
    return mode in GLOBAL_MODES


def mode_of(use_local, use_global):
    """The mode with local and/or global outputs (at least one of them is assumed)."""
    if use_local and use_global:
        return "local_and_global"
    return "local" if use_local else "global"


def canonical_superglobal(modules, mode="local_and_global", field="superglobal", owner=None):
    """Validated SuperGlobal modules in the canonical order of `SUPERGLOBAL_MODULES`.

    Args:
      modules: a subset of `SUPERGLOBAL_MODULES` (any order), or ("all",) for every
        module; a comma-separated string is split.
      mode: the extraction mode; the modules act on the global descriptor, so
        "local" refuses any.
      field: how messages name the option (the flag / field).
      owner: see `delg_tf.configs.field_name` (None: the flag `--<field>`).

    Returns:
      tuple of module names, canonical order (() = the paper's DELG pooling).

    Raises:
      ConfigError: unknown names (listed with the valid ones), duplicates, or
        modules with mode "local".
    """
    if isinstance(modules, str):
        modules = [m for m in modules.split(",") if m]
    names = [str(m).strip() for m in modules]
    valid = f"a subset of {', '.join(SUPERGLOBAL_MODULES)} (comma-separated) or {SUPERGLOBAL_ALL}"
    if SUPERGLOBAL_ALL in names:
        expect(
            names == [SUPERGLOBAL_ALL],
            field,
            valid,
            names,
            owner=owner,
            fix=f"'{SUPERGLOBAL_ALL}' already names every module",
        )
        names = list(SUPERGLOBAL_MODULES)
    unknown = [m for m in names if m not in SUPERGLOBAL_MODULES]
    expect(not unknown, field, valid, names, owner=owner, fix=f"unknown: {', '.join(unknown)}")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    expect(
        not duplicates,
        field,
        f"{valid}, each at most once",
        names,
        owner=owner,
        fix=f"repeated: {', '.join(duplicates)}",
    )
    expect(
        not names or mode != "local",
        field,
        "empty when only local features are extracted (the SuperGlobal modules change "
        "the global descriptor)",
        names,
        owner=owner,
        fix="keep the global descriptor (drop --noexport_global) or drop the modules",
    )
    return tuple(m for m in SUPERGLOBAL_MODULES if m in names)


def global_aggregation(modules):
    """How the per-scale global descriptors are combined (after per-scale L2) for
    SuperGlobal `modules`: `AGGREGATION_MAX` with Scale-GeM, else `AGGREGATION_SUM`.
    """
    return AGGREGATION_MAX if SCALE_GEM in modules else AGGREGATION_SUM


_OWNER = "ExportConfig"  # how error messages name its fields.


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What is baked into an export (defaults of the bytes signature and config asset).

    Also the default extraction parameters of `DelgExtractor.from_model` and of
    SavedModels without a config asset.

    Each attribute but `mode` is also a flag of `python -m delg_tf.export` (this
    section is their help).

    Attributes:
      mode: "local_and_global", "local" or "global".
      image_scales: Pyramid scales.
      global_scales_ind: Scale indices (into image_scales) of the global descriptor.
      max_feature_num: Local features kept at most.
      score_threshold: Absolute attention threshold of local features.
      iou_threshold: NMS IoU of local features (1.0 = none).
      max_image_size: Resize larger images to this side on the host (-1 = none).
      min_image_size: Resize smaller images to this side on the host (-1 = none).
      use_square_images: Resize images to a square of their largest side.
      warmup: Write the TF Serving warm-up requests (DELG).
      superglobal: SuperGlobal pooling modules (Shao et al. ICCV 2023) baked into the
        global descriptor: a comma-separated subset of gem_plus (GeM power 4.6),
        regional_gem (5x5 Lp-2.5 pool mixed 0.5/0.5 with conv5, before GeM),
        scale_gem (max over the global scales of the L2-normalised descriptors
        instead of their sum), relu_plus (residual outputs of conv2_x..conv4_x
        clamped at 0.014 on the global path), or all. Empty: the DELG pooling.
    """

    mode: str = "local_and_global"
    image_scales: Tuple[float, ...] = DEFAULT_IMAGE_SCALES
    global_scales_ind: Tuple[int, ...] = DEFAULT_GLOBAL_SCALES_IND
    max_feature_num: int = DEFAULT_MAX_FEATURE_NUM
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    min_image_size: int = NO_SIZE_LIMIT
    use_square_images: bool = False
    warmup: bool = True
    superglobal: Tuple[str, ...] = ()

    def __post_init__(self):
        expect_choice("mode", self.mode, MODES, owner=_OWNER)
        object.__setattr__(self, "superglobal", canonical_superglobal(self.superglobal, self.mode))
        expect(
            bool(self.image_scales) and min(self.image_scales) > 0,
            "image_scales",
            "a non-empty list of positive floats",
            list(self.image_scales),
            owner=_OWNER,
        )
        bad = [i for i in self.global_scales_ind if not 0 <= i < len(self.image_scales)]
        if self.mode != "local" and bad:
            raise ConfigError(
                f"{_OWNER}.global_scales_ind {list(self.global_scales_ind)} has "
                f"indices {bad} outside [0, {len(self.image_scales)}) "
                f"(image_scales has {len(self.image_scales)} entries).",
                "global_scales_ind",
            )
        expect(
            self.max_feature_num >= 0, "max_feature_num", ">= 0", self.max_feature_num, owner=_OWNER
        )

    @property
    def use_local(self):
        return mode_uses_local(self.mode)

    @property
    def use_global(self):
        return mode_uses_global(self.mode)

    def to_delf_config(self, model_path="."):
        """The equivalent official DelfConfig proto."""
        config = delf_config_pb2.DelfConfig()
        config.model_path = model_path
        config.use_local_features = self.use_local
        config.use_global_features = self.use_global
        config.is_tf2_exported = True
        config.image_scales.extend(self.image_scales)
        config.max_image_size = self.max_image_size
        config.min_image_size = self.min_image_size
        config.use_square_images = self.use_square_images
        config.delf_local_config.use_pca = False
        config.delf_local_config.max_feature_num = self.max_feature_num
        config.delf_local_config.score_threshold = self.score_threshold
        config.delf_local_config.iou_threshold = self.iou_threshold
        config.delf_global_config.use_pca = False
        config.delf_global_config.image_scales_ind.extend(self.global_scales_ind)
        return config

    @classmethod
    def from_delf_config(cls, config, **overrides):
        """ExportConfig from a DelfConfig proto (PCA is not supported in the graph)."""
        values = dict(
            mode=mode_of(config.use_local_features, config.use_global_features),
            image_scales=tuple(config.image_scales) or DEFAULT_IMAGE_SCALES,
            global_scales_ind=(
                tuple(config.delf_global_config.image_scales_ind)
                or tuple(range(len(config.image_scales)))
            ),
            max_feature_num=config.delf_local_config.max_feature_num,
            score_threshold=config.delf_local_config.score_threshold,
            iou_threshold=config.delf_local_config.iou_threshold,
            max_image_size=config.max_image_size,
            min_image_size=config.min_image_size,
            use_square_images=config.use_square_images,
        )
        values.update(overrides)
        return cls(**values)


def looks_like_config_path(config):
    """True if `config` names a DelfConfig file rather than holding pbtxt text.

    A `PathLike`, an existing file, or a one-line string that ends in a config file
    suffix (`.pbtxt`, `.txt`, ...) or holds a path separator but no ':' (every
    DelfConfig field is written `name: value` or `name { ... }`).
    """
    if isinstance(config, os.PathLike):
        return True
    text = str(config).strip()
    if not text or "\n" in text or "{" in text:
        return False
    if Path(text).is_file() or text.lower().endswith(CONFIG_FILE_SUFFIXES):
        return True
    has_separator = "/" in text or os.sep in text
    return has_separator and ":" not in text


def load_delf_config(config):
    """DelfConfig from a proto, a `.pbtxt` path or pbtxt text.

    Raises:
      FileNotFoundError: `config` names a file (see `looks_like_config_path`) that does
        not exist.
      ValueError: the text is not a DelfConfig text proto.
    """
    if isinstance(config, delf_config_pb2.DelfConfig):
        return config
    parsed = delf_config_pb2.DelfConfig()
    if looks_like_config_path(config):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(
                f"DelfConfig file {path} does not exist; pass an existing .pbtxt (e.g. the "
                "official r50delg_gld_config.pbtxt) as --delf_config, or use --model_path "
                "alone."
            )
        text, origin = path.read_text(), str(path)
    else:
        text, origin = str(config), "<text>"
    try:
        text_format.Parse(text, parsed)
    except text_format.ParseError as e:
        raise ValueError(
            f"{origin}: not a valid DelfConfig text proto ({e}); expected fields "
            "of delf_config.proto (model_path, image_scales, delf_local_config, "
            "...)"
        ) from e
    return parsed


def config_asset_path(export_path):
    """Where an export keeps its DelfConfig: EXPORT/assets.extra/delf_config.pbtxt."""
    return Path(export_path) / ASSETS_EXTRA_DIR / CONFIG_ASSET


def read_export_config(export_path):
    """The DelfConfig baked into an export (`assets.extra/delf_config.pbtxt`), or None."""
    path = config_asset_path(export_path)
    if not path.is_file():
        return None
    config = delf_config_pb2.DelfConfig()
    text_format.Parse(path.read_text(), config)
    config.model_path = str(Path(export_path))
    return config


def superglobal_asset_path(export_path):
    """Where an export records its SuperGlobal modules (`SUPERGLOBAL_ASSET` in assets.extra)."""
    return Path(export_path) / ASSETS_EXTRA_DIR / SUPERGLOBAL_ASSET


def read_superglobal_asset(export_path):
    """The SuperGlobal modules recorded in an export (`SUPERGLOBAL_ASSET`), or () without one.

    Raises:
      ValueError: the asset is not a JSON object whose "modules" lists known modules
        (the message names the file).
    """
    path = superglobal_asset_path(export_path)
    if not path.is_file():
        return ()
    try:
        asset = json.loads(path.read_text())
        modules = asset[SUPERGLOBAL_ASSET_MODULES_KEY]
        if not isinstance(modules, list):
            raise TypeError(f"{SUPERGLOBAL_ASSET_MODULES_KEY!r} is {type(modules).__name__}")
        return canonical_superglobal(
            modules, field=SUPERGLOBAL_ASSET_MODULES_KEY, owner=SUPERGLOBAL_ASSET
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path}: expected a JSON object with {SUPERGLOBAL_ASSET_MODULES_KEY!r}: a list of "
            f"{', '.join(SUPERGLOBAL_MODULES)} (written by python -m delg_tf.export "
            f"--superglobal); {error}; re-export the model."
        ) from error


def saved_model_delf_config(export_path, use_local, use_global):
    """The DelfConfig to run a SavedModel with when none is given.

    The config baked into a delg_tf export, else the official defaults for the
    model's outputs (`use_local` / `use_global`), e.g. for official DELG releases.
    """
    config = read_export_config(export_path)
    if config is None:
        config = ExportConfig(mode=mode_of(use_local, use_global)).to_delf_config(str(export_path))
    return config
