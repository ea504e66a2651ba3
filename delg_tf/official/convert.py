"""Conversion of an official DELG SavedModel into a trainable delg_tf `DelgModel`.

`convert(config)`:

1. detects the format (TF1 tf-slim release / TF2 official export) from the model;
2. reads its variables from ``DIR/variables/variables`` (the graph is not run);
3. builds a `DelgModel` with the official numerics -- TF1: the ``slim`` backbone
   layout (stride in the 3x3 of the last unit, ``conv2d_same`` padding, SAME
   pool1, no conv biases, BN epsilon 1e-5; attention BN epsilon 1e-5, no conv1
   bias, attention on S); TF2: the ``tf2_delf`` layout (biased convs, Keras
   'same' stem, VALID pool1, BN epsilon 1e-3, 1x1/2 max-pool after conv4;
   attention on the autoencoder output S'); both exports normalise pixels as
   (x - 128) / 128 (``export_model_utils.py``), i.e. ``"delf_tf1"``;
4. maps every variable by name (or, for head layers with unknown scopes, by role
   and shape), prints the mapping, and refuses with the list of what did not fit;
5. **self-check**: runs the source SavedModel and the converted model (delg_tf's
   `PyramidExtractor`) on real photos (``skimage.data``) with every cell kept,
   matches local features by (location, scale) and compares the final global
   descriptor, the L2-normalised descriptors and the attention; refuses to write
   anything unless all are within tolerance;
6. writes ``OUT/checkpoint/`` (``tf.train.Checkpoint(model=model)``, the format
   `delg_tf.train --init_from` restores), ``OUT/model_config.json`` (the
   `DelgModelConfig`), ``OUT/conversion.json`` (source, mapping, numerics
   overrides, self-check numbers) and ``OUT/saved_model/`` (a delg_tf export with
   the official ``serving_default`` signature), all at once via a temporary
   directory renamed at the end.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from delg_tf import atomic
from delg_tf.configs import ConfigError, expect
from delg_tf.extraction.config import DEFAULT_GLOBAL_SCALES_IND, DEFAULT_IMAGE_SCALES
from delg_tf.extraction.raw_model import FORMAT_TF1, FORMAT_TF2, detect_format
from delg_tf.official import mapping as mapping_lib
from delg_tf.official import selfcheck
from delg_tf.official import variables as variables_lib
from delg_tf.official.variables import OfficialModelError

BACKBONES = ("r50", "r101")
DEPTH_OF_BACKBONE = {"r50": 50, "r101": 101}
# Official export numerics per format (see the module doc and the fixture READMEs).
OFFICIAL_IMAGE_NORMALIZATION = "delf_tf1"  # (x - 128) / 128 in both official exporters.
TF1_ATTENTION_BN_EPSILON = 1e-5  # slim resnet_arg_scope, also around the attention head.
TF2_ATTENTION_BN_EPSILON = 1e-3  # Keras default in the official TF2 AttentionModel.
# Self-check inputs: official R50 DELG pyramid on skimage photos shrunk to this side.
SELF_CHECK_IMAGES = ("chelsea", "coffee", "astronaut")
SELF_CHECK_MAX_SIDE = 320
SELF_CHECK_SCALES = DEFAULT_IMAGE_SCALES
SELF_CHECK_GLOBAL_SCALES_IND = DEFAULT_GLOBAL_SCALES_IND
# Every cell is compared: no threshold, no top-K cut.
SELF_CHECK_ABS_THRES = 0.0
SELF_CHECK_MAX_FEATURE_NUM = 1_000_000
CHECKPOINT_DIR = "checkpoint"
# tf.train.Checkpoint(model=...): the key delg_tf.train --init_from restores.
CHECKPOINT_MODEL_KEY = "model"
SAVED_MODEL_DIR = "saved_model"
MODEL_CONFIG_FILE = "model_config.json"
CONVERSION_FILE = "conversion.json"
MODEL_FLAGS_FILE = "model.flags"
# num_classes of the converted model: official exports carry no classifier;
# the trainer sets the real number (the classifier heads are not converted).
CONVERTED_NUM_CLASSES = 1
_BUILD_PROBE_SIDE = 64
_ALWAYS_FLAGS = (
    "backbone",
    "backbone_layout",
    "image_normalization",
    "attention_input",
    "attention_bn_epsilon",
)
_RGB = 3


class SelfCheckError(OfficialModelError):
    """The converted model does not reproduce the official model within tolerance."""


@dataclasses.dataclass
class ConvertConfig:
    """Configuration of `convert`.

    Attributes:
      model_path: official DELG SavedModel directory (saved_model.pb + variables/).
      output_dir: where to write checkpoint/, saved_model/ and the JSON files.
      backbone: "r50", "r101" or None (inferred from the variables).
      overwrite: replace an existing non-empty output_dir.
      self_check_images: names of `skimage.data` photos used by the self-check.
      self_check_max_side: the photos are shrunk (Pillow bilinear) to this side.
      global_tolerance: max abs difference of the final global descriptor.
      descriptor_tolerance: max abs difference of matched L2-normalised descriptors.
      attention_tolerance: max abs difference of matched attention scores.
      export: write OUT/saved_model (a delg_tf export).
      verify_export: reload the export and self-check it on the first photo.
    """

    model_path: str
    output_dir: str
    backbone: str = None
    overwrite: bool = False
    self_check_images: tuple = SELF_CHECK_IMAGES
    self_check_max_side: int = SELF_CHECK_MAX_SIDE
    global_tolerance: float = selfcheck.GLOBAL_MAX_ABS_TOLERANCE
    descriptor_tolerance: float = selfcheck.LOCAL_DESCRIPTOR_TOLERANCE
    attention_tolerance: float = selfcheck.ATTENTION_TOLERANCE
    export: bool = True
    verify_export: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Checks every field (done at construction); returns self.

        Raises:
          ConfigError: naming the flag, the expected and the received value.
        """

        def check(ok, field, expected):
            expect(ok, field, expected, getattr(self, field))

        check(bool(self.model_path), "model_path", "an official DELG SavedModel directory")
        check(bool(self.output_dir), "output_dir", "a directory to write the conversion to")
        check(
            self.backbone is None or self.backbone in BACKBONES,
            "backbone",
            f"one of {BACKBONES} (or unset to infer it)",
        )
        check(len(self.self_check_images) >= 1, "self_check_images", "at least one photo")
        check(self.self_check_max_side >= 32, "self_check_max_side", "an integer >= 32")
        for field in ("global_tolerance", "descriptor_tolerance", "attention_tolerance"):
            check(getattr(self, field) > 0, field, "a positive number")
        if Path(self.model_path).resolve() == Path(self.output_dir).resolve():
            raise ConfigError("--output_dir must differ from --model_path.", "output_dir")
        return self


def official_model_config(fmt, backbone):
    """`DelgModelConfig` reproducing an official export of format `fmt`."""
    from delg_tf.models.delg import DelgModelConfig

    if fmt == FORMAT_TF1:
        return DelgModelConfig(
            num_classes=CONVERTED_NUM_CLASSES,
            backbone=backbone,
            backbone_layout="slim",
            image_normalization=OFFICIAL_IMAGE_NORMALIZATION,
            attention_use_bn=True,
            attention_conv1_bias=False,
            attention_bn_epsilon=TF1_ATTENTION_BN_EPSILON,
            attention_input="features",
        )
    if fmt == FORMAT_TF2:
        return DelgModelConfig(
            num_classes=CONVERTED_NUM_CLASSES,
            backbone=backbone,
            backbone_layout="tf2_delf",
            image_normalization=OFFICIAL_IMAGE_NORMALIZATION,
            attention_use_bn=True,
            attention_conv1_bias=True,
            attention_bn_epsilon=TF2_ATTENTION_BN_EPSILON,
            attention_input="reconstruction",
            attention_pool_source="features",
            attention_pool_reduction="mean",
            attention_pool_normalize=True,
        )
    raise OfficialModelError(f"format must be 'tf1' or 'tf2', received {fmt!r}.")


def model_flags(model_config):
    """`delg_tf.train` flagfile text with the model fields that differ from the defaults."""
    from delg_tf.models.delg import DelgModelConfig

    defaults = DelgModelConfig(num_classes=CONVERTED_NUM_CLASSES).to_dict()
    lines = [
        "# Model flags of a converted official DELG model (python -m delg_tf.convert_official).",
        "--model_family=delg",
    ]
    for name, value in model_config.to_dict().items():
        if name == "num_classes" or (value == defaults[name] and name not in _ALWAYS_FLAGS):
            continue
        text = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"--{name}={text}")
    return "\n".join(lines) + "\n"


def attention_bn_epsilon(fmt):
    return TF1_ATTENTION_BN_EPSILON if fmt == FORMAT_TF1 else TF2_ATTENTION_BN_EPSILON


def build_converted_model(model_config, bn_epsilon_attention=None):
    """Builds a `DelgModel` for inference weights only (no classifier variables).

    The classifier heads stay unbuilt, so the checkpoint holds exactly the
    converted weights and restores into a model with any number of classes.
    """
    import tensorflow as tf
    from delg_tf.models.delg import DelgModel

    model = DelgModel(model_config)
    if bn_epsilon_attention is not None and model.attention.bn_conv1 is not None:
        # Older configs (conversion.json numerics) may disagree with the config field.
        model.attention.bn_conv1.epsilon = float(bn_epsilon_attention)
    model.backbone(tf.zeros([1, _BUILD_PROBE_SIDE, _BUILD_PROBE_SIDE, _RGB]), training=False)
    s_shape = (None, None, None, model.local_channels)
    model.gem.build((None, None, None, model.global_channels))
    model.whitening.build((None, model.global_channels))
    model.autoencoder.build(s_shape)
    model.attention.build(s_shape)
    model.built = True
    return model


def self_check_images(names=SELF_CHECK_IMAGES, max_side=SELF_CHECK_MAX_SIDE):
    """[(name, uint8 RGB array)] from skimage.data, shrunk with Pillow bilinear."""
    from PIL import Image
    import skimage.data

    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(
                f"self-check image {name!r} is not in skimage.data; use e.g. "
                f"{list(SELF_CHECK_IMAGES)}."
            )
        image = np.asarray(loader())
        if image.ndim == 2:
            image = np.stack([image] * _RGB, axis=-1)
        image = image[..., :_RGB].astype(np.uint8)
        height, width = image.shape[:2]
        factor = max_side / max(height, width)
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        images.append((name, image))
    return images


def run_self_check(reference_fn, candidate_fn, images, config, log=print, label="converted"):
    """Compares two raw extraction functions on `images`. Returns a list of dicts.

    Raises:
      SelfCheckError: with the measured differences if any image is out of tolerance.
    """
    results, failures = [], []
    for name, image in images:
        args = (
            image,
            np.asarray(SELF_CHECK_SCALES, np.float32),
            SELF_CHECK_MAX_FEATURE_NUM,
            SELF_CHECK_ABS_THRES,
            np.asarray(SELF_CHECK_GLOBAL_SCALES_IND, np.int32),
        )
        reference = reference_fn(*args)
        candidate = candidate_fn(*args)
        comparison = selfcheck.compare_raw_outputs(reference, candidate)
        ok = comparison.within(
            config.global_tolerance, config.descriptor_tolerance, config.attention_tolerance
        )
        log(
            f"self-check [{label}] {name} {image.shape[0]}x{image.shape[1]}: "
            f"{comparison.describe()} -> {'OK' if ok else 'FAIL'}"
        )
        results.append(
            {
                "image": name,
                "shape": list(image.shape),
                "ok": bool(ok),
                **dataclasses.asdict(comparison),
            }
        )
        if not ok:
            failures.append(f"{name}: {comparison.describe()}")
    if failures:
        raise SelfCheckError(
            f"self-check failed: the {label} model does not reproduce the official model "
            f"within tolerance (global max abs <= {config.global_tolerance}, all local "
            f"features matched by (location, scale), descriptors <= "
            f"{config.descriptor_tolerance}, attention <= {config.attention_tolerance}):\n  "
            + "\n  ".join(failures)
            + "\nNothing was written. The official model's numerics differ from what the "
            "converter assumes (e.g. resize flavour, BN epsilon, normalisation); please "
            "report this with the printed mapping."
        )
    return results


def _resolve_backbone(config, official, log):
    depth = mapping_lib.infer_depth(official.tensors, official.format)
    inferred = {50: "r50", 101: "r101"}.get(depth)
    if config.backbone is None:
        if inferred is None:
            raise OfficialModelError(
                f"{config.model_path}: cannot infer the ResNet depth from the variables "
                f"(no conv4 units found); pass --backbone=r50 or --backbone=r101."
            )
        log(f"backbone: {inferred} (inferred from the conv4 units)")
        return inferred
    if inferred is not None and inferred != config.backbone:
        raise OfficialModelError(
            f"--backbone={config.backbone} but {config.model_path} holds a {inferred} "
            f"backbone ({depth} layers); pass --backbone={inferred}."
        )
    return config.backbone


def _check_checkpoint_complete(checkpoint_path, model):
    """Every model variable must be in the checkpoint (guards against untracked layers)."""
    import tensorflow as tf

    saved = [
        name
        for name, _ in tf.train.list_variables(checkpoint_path)
        if name.startswith(CHECKPOINT_MODEL_KEY + "/")
        and name.endswith(variables_lib.VARIABLE_VALUE_SUFFIX)
    ]
    if len(saved) != len(model.variables):
        raise OfficialModelError(
            f"{checkpoint_path}: the checkpoint holds {len(saved)} variables, expected all "
            f"{len(model.variables)} of the model; some layers are not tracked by "
            f"tf.train.Checkpoint (e.g. layers kept only in Python lists)."
        )


def _prepare_output(config):
    out = Path(config.output_dir).absolute()
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"--output_dir={out} exists and is not empty; expected a new or empty directory. "
            f"Pass --overwrite to replace it."
        )
    return out


def convert(config, log=print):
    """Converts an official DELG SavedModel (see the module doc). Returns the output Path.

    Raises:
      ModelFormatError (not a DELG SavedModel) / OfficialModelError / MappingError /
        SelfCheckError: with what was expected and received; nothing is written in
        that case.
    """
    import tensorflow as tf
    from delg_tf.extraction import pyramid
    from delg_tf.extraction.raw_model import load_raw_extraction_fn
    from delg_tf.serving import delg_export

    config.validate()
    out = _prepare_output(config)
    fmt = detect_format(config.model_path)
    log(f"official model: {config.model_path} (format {fmt.upper()})")
    official = variables_lib.read_official_variables(config.model_path, fmt)
    log(f"read {len(official.tensors)} float variables")
    backbone = _resolve_backbone(config, official, log)
    model_config = official_model_config(fmt, backbone)
    epsilon = attention_bn_epsilon(fmt)
    model = build_converted_model(model_config, epsilon)
    variable_mapping = mapping_lib.map_official_variables(
        official.tensors, fmt, mapping_lib.model_targets(model)
    )
    log(f"mapping ({len(variable_mapping.assignments)} variables):")
    log(variable_mapping.describe(official.tensors))
    mapping_lib.assign_to_model(model, variable_mapping, official.tensors)

    images = self_check_images(config.self_check_images, config.self_check_max_side)
    reference_fn = load_raw_extraction_fn(config.model_path)
    candidate_fn = pyramid.PyramidExtractor(model)
    results = run_self_check(reference_fn, candidate_fn, images, config, log)

    # Written aside and renamed into place: `out` is the old or the new conversion.
    with atomic.staged_directory(out) as tmp:
        tmp.mkdir()
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(**{CHECKPOINT_MODEL_KEY: model}),
            str(tmp / CHECKPOINT_DIR),
            max_to_keep=1,
        )
        checkpoint_path = manager.save(checkpoint_number=0)
        _check_checkpoint_complete(checkpoint_path, model)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=1))
        (tmp / MODEL_FLAGS_FILE).write_text(model_flags(model_config))
        export_results = []
        if config.export:
            delg_export.export_saved_model(model, tmp / SAVED_MODEL_DIR)
            if config.verify_export:
                exported = load_raw_extraction_fn(tmp / SAVED_MODEL_DIR)
                export_results = run_self_check(
                    reference_fn, exported, images[:1], config, log, label="exported"
                )
        record = {
            "source": str(Path(config.model_path).absolute()),
            "source_format": fmt,
            "backbone": backbone,
            "numerics": {
                "backbone_layout": model_config.backbone_layout,
                "image_normalization": model_config.image_normalization,
                "attention_bn_epsilon": epsilon,
                "attention_input": model_config.attention_input,
            },
            "checkpoint": os.path.relpath(checkpoint_path, tmp),
            "mapping": {
                target: {"source": source, "by": how}
                for target, (source, how) in sorted(variable_mapping.assignments.items())
            },
            "ignored": variable_mapping.ignored,
            "self_check": results,
            "export_self_check": export_results,
        }
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=1))
    log(
        f"wrote {out}/{CHECKPOINT_DIR}, {out}/{MODEL_CONFIG_FILE}, {out}/{MODEL_FLAGS_FILE}, "
        f"{out}/{CONVERSION_FILE}" + (f", {out}/{SAVED_MODEL_DIR}" if config.export else "")
    )
    log(
        f"fine-tune: python -m delg_tf.train --flagfile={out}/{MODEL_FLAGS_FILE} "
        f"--init_from={out}/{CHECKPOINT_DIR} --logdir=... (data flags)"
    )
    return out


def load_converted_model(output_dir):
    """Rebuilds the converted `DelgModel` from OUT (model_config.json, checkpoint/, ...)."""
    import tensorflow as tf
    from delg_tf.models.delg import DelgModelConfig

    output_dir = Path(output_dir)
    model_config = DelgModelConfig.from_dict(
        json.loads((output_dir / MODEL_CONFIG_FILE).read_text())
    )
    numerics = json.loads((output_dir / CONVERSION_FILE).read_text())["numerics"]
    model = build_converted_model(model_config, numerics["attention_bn_epsilon"])
    path = tf.train.latest_checkpoint(str(output_dir / CHECKPOINT_DIR))
    if path is None:
        raise OfficialModelError(
            f"{output_dir}/{CHECKPOINT_DIR}: no checkpoint found; expected "
            f"the output of python -m delg_tf.convert_official."
        )
    tf.train.Checkpoint(model=model).restore(path).assert_existing_objects_matched()
    return model
