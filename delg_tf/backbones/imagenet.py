"""ImageNet initialisation of the ResNet backbone.

`load_imagenet_weights(backbone, spec)` with spec:

* None or "" -- keep the random initialisation (logged);
* "imagenet" -- keras.applications ResNet50/101 ImageNet weights (downloaded by
  Keras, or taken from its cache ~/.keras/models); only for layout "keras";
* a path to a Keras weights file (.h5 / .weights.h5 / .keras of
  keras.applications ResNet50/101, include_top=False or True) -- layout "keras";
* a path to a tf-slim ``resnet_v1_50`` / ``resnet_v1_101`` checkpoint (prefix such
  as ``resnet_v1_50.ckpt``, or a directory) -- layout "slim" (the paper's).

Weights are copied by name (`delg_tf.backbones.naming`) with shape checks; any
missing or mismatched weight raises one error listing them, before anything is
assigned.
"""

import logging
import os

import keras
import tensorflow as tf

from delg_tf.backbones import naming
from delg_tf.backbones import resnet

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
KERAS_WEIGHT_SUFFIXES = (".h5", ".hdf5", ".keras")
KERAS_APPLICATIONS = {50: "ResNet50", 101: "ResNet101"}
MAX_LISTED_PROBLEMS = 20


class ImageNetWeightsError(ValueError):
    """ImageNet weights could not be found, read or matched to the backbone.

    A ValueError, so that callers treating bad configuration values as one-line
    errors (the trainer) report it as such.
    """


def _depth_of(backbone):
    for depth, units in resnet.UNITS_PER_STAGE.items():
        if tuple(backbone.units) == units and backbone.base_width == resnet.DEFAULT_BASE_WIDTH:
            return depth
    return None


def _backbone_variables(backbone):
    """Our key -> variable for every backbone weight."""
    if not backbone.built or not backbone.weights:
        backbone(tf.zeros([1, 64, 64, 3]), training=False)
    return {naming.relative_key(v.path, backbone.name): v for v in backbone.weights}


def _assign_all(backbone, values, source):
    """Checks then assigns {our key: array}; raises listing every problem."""
    variables = _backbone_variables(backbone)
    problems = []
    for key, variable in variables.items():
        if key not in values:
            problems.append(f"{key}: missing in {source}")
        elif tuple(values[key].shape) != tuple(variable.shape):
            problems.append(
                f"{key}: expected shape {tuple(variable.shape)}, received "
                f"{tuple(values[key].shape)}"
            )
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise ImageNetWeightsError(
            f"{source} does not fit the {backbone.layout!r} backbone ({len(problems)} "
            f"problems):\n  {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nCheck the depth (r50/r101) and layout of the backbone against the file."
        )
    for key, variable in variables.items():
        variable.assign(values[key])
    logger.info("Backbone initialised from %s (%d weights).", source, len(variables))
    return len(variables)


def _require_layout(backbone, layout, spec):
    if backbone.layout != layout:
        raise ImageNetWeightsError(
            f"imagenet weights {spec!r} are {layout!r}-layout weights but the backbone layout is "
            f"{backbone.layout!r}. Use backbone_layout={layout!r}, or give weights of the "
            f"{backbone.layout!r} layout (slim: a tf-slim resnet_v1 checkpoint; keras: "
            f"'imagenet' or a keras.applications .h5)."
        )


def load_keras_application(backbone, application_model, source="keras.applications"):
    """Copies a keras.applications ResNet50/101 model's weights into `backbone`."""
    values = {}
    for layer in application_model.layers:
        for weight in layer.weights:
            key = naming.keras_applications_to_key(layer.name, weight.name)
            if key is not None:
                values[key] = weight.numpy()
    return _assign_all(backbone, values, source)


def _keras_weights(backbone, spec):
    _require_layout(backbone, "keras", spec)
    depth = _depth_of(backbone)
    if depth is None:
        raise ImageNetWeightsError(
            f"keras.applications ImageNet weights exist for ResNet-50/101 only; the backbone "
            f"has units {backbone.units} and base width {backbone.base_width}."
        )
    constructor = getattr(keras.applications, KERAS_APPLICATIONS[depth])
    include_top = False
    if spec != IMAGENET:
        include_top = _h5_has_top(spec)
    try:
        app = constructor(
            include_top=include_top,
            weights=spec,
            input_shape=None if include_top else (None, None, 3),
        )
    except Exception as error:  # Download or file errors come in many types.
        if spec == IMAGENET:
            raise ImageNetWeightsError(
                f"ImageNet weights for keras.applications.{KERAS_APPLICATIONS[depth]} are "
                f"unreachable (download failed: {type(error).__name__}: {error}). Pass a local "
                f"weights file instead, e.g. imagenet_weights=/path/to/resnet{depth}_weights_tf_"
                f"dim_ordering_tf_kernels_notop.h5, or put it in ~/.keras/models/."
            ) from error
        raise ImageNetWeightsError(
            f"could not load {spec!r} into keras.applications.{KERAS_APPLICATIONS[depth]}: "
            f"{type(error).__name__}: {error}. Expected that model's weights file."
        ) from error
    return load_keras_application(backbone, app, source=f"{spec} (keras.applications)")


def _h5_has_top(path):
    """Whether a keras.applications .h5 file holds the classification layer."""
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            names = set()
            handle.visit(names.add)
        return any("predictions" in name for name in names)
    except (OSError, ImportError):
        return False


def _slim_checkpoint_path(spec):
    if os.path.isdir(spec):
        latest = tf.train.latest_checkpoint(spec)
        if latest is not None:
            return latest
        index_files = [f for f in os.listdir(spec) if f.endswith(".index")]
        if len(index_files) == 1:
            return os.path.join(spec, index_files[0][: -len(".index")])
        raise ImageNetWeightsError(
            f"no TF checkpoint found in directory {spec!r}: expected a 'checkpoint' file or "
            f"exactly one '*.index' file (found {len(index_files)})."
        )
    return spec


def load_slim_checkpoint(backbone, path, scope=None):
    """Loads a tf-slim resnet_v1_50/101 checkpoint into a 'slim'-layout backbone.

    Args:
      backbone: a `resnet.ResNet` with layout "slim".
      path: checkpoint prefix (e.g. ".../resnet_v1_50.ckpt") or directory.
      scope: the slim scope; None detects it ("resnet_v1_50" / "resnet_v1_101" or
        any scope with a "<scope>/conv1/weights" variable).

    Returns:
      The number of weights loaded.
    """
    _require_layout(backbone, "slim", path)
    path = _slim_checkpoint_path(path)
    try:
        reader = tf.train.load_checkpoint(path)
    except Exception as error:  # NotFoundError / DataLossError / ValueError.
        raise ImageNetWeightsError(
            f"cannot read TF checkpoint {path!r}: {type(error).__name__}: {error}. Expected a "
            f"tf-slim checkpoint prefix such as resnet_v1_50.ckpt (with its .index file)."
        ) from error
    names = reader.get_variable_to_shape_map()
    if scope is None:
        scopes = sorted(
            {
                n.split("/")[0]
                for n in names
                if n.endswith("/conv1/weights") and naming.slim_to_key(n) is not None
            }
        )
        if len(scopes) != 1:
            raise ImageNetWeightsError(
                f"{path}: expected exactly one tf-slim ResNet scope with '<scope>/conv1/weights' "
                f"(e.g. resnet_v1_50), found {scopes}. Pass scope= explicitly."
            )
        scope = scopes[0]
    values = {}
    for name in names:
        if not name.startswith(scope + "/"):
            continue
        key = naming.slim_to_key(name)
        if key is not None:
            values[key] = reader.get_tensor(name)
    return _assign_all(backbone, values, f"{path} (tf-slim scope {scope})")


def load_imagenet_weights(backbone, spec):
    """Initialises `backbone` from `spec` (see the module doc).

    Returns:
      A one-line description of what was done (also logged).
    """
    if not spec:
        message = (
            "Backbone randomly initialised: no ImageNet weights given (set "
            "imagenet_weights to 'imagenet' for the keras layout or to a tf-slim "
            "resnet_v1 checkpoint for the slim layout)."
        )
        logger.warning(message)
        return message
    if spec == IMAGENET:
        count = _keras_weights(backbone, spec)
    else:
        spec = os.fspath(spec)
        looks_like_checkpoint = os.path.exists(spec + ".index") or os.path.isdir(spec)
        if not (os.path.exists(spec) or looks_like_checkpoint):
            raise ImageNetWeightsError(
                f"imagenet weights path {spec!r} does not exist. Expected 'imagenet', a "
                f"keras.applications .h5 file or a tf-slim checkpoint prefix."
            )
        if spec.endswith(KERAS_WEIGHT_SUFFIXES) and not looks_like_checkpoint:
            count = _keras_weights(backbone, spec)
        else:
            count = load_slim_checkpoint(backbone, spec)
    message = f"Backbone initialised from ImageNet weights {spec!r} ({count} weights)."
    logger.info(message)
    return message
