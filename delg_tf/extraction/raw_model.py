"""Loading any DELG SavedModel: format detection and the raw extraction function.

`load_raw_extraction_fn(path)` returns a `RawExtractionFn`: a callable
`(image, scales, max_feature_num, abs_thres, global_scales_ind) -> dict` with
the official raw outputs (`boxes` f32[N, 4] (ymin, xmin, ymax, xmax) in pixels of
`image`, `features` f32[N, D] raw, `scales` f32[N] = 1 / pyramid scale,
`scores` f32[N, 1] attention, `global_descriptors` f32[G, C] raw, one row per
selected scale; whichever the model has), for every DELG format (`detect_format`,
from the model itself, never from a config flag; a DelfConfig's
`is_tf2_exported` is only a hint):

* `FORMAT_TF2` -- delg_tf exports and exports of the official TF2 code: the
  `serving_default` signature with the official input names; the variant
  (local+global, local, global) is read from its inputs.
* `FORMAT_TF1` -- the 2020 released models (``r50delg_gld_20200814`` and
  friends): no signature, called by tensor names (`input_image:0` ... ->
  `boxes:0` ...) via `.prune`, as the official extractor
  (``delf/python/extractor.py``, ``is_tf2_exported: false``) does
  (`load_tf1_extraction_fn`).

The SuperGlobal modules a delg_tf export was made with (its asset
`assets.extra/delg_tf_superglobal.json`, `config.read_superglobal_asset`; () for
every other SavedModel) come with the function as `RawExtractionFn.superglobal`,
so the host-side post-processing (`DelgExtractor`) aggregates the per-scale
global descriptors as the export does (Scale-GeM: max instead of sum).
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

from delg_tf.extraction import config as config_lib

SAVED_MODEL_FILE = "saved_model.pb"
SIGNATURE_DEFAULT = "serving_default"
IMAGE_INPUT = "input_image"
SCALES_INPUT = "input_scales"
LOCAL_INPUTS = ("input_max_feature_num", "input_abs_thres")
GLOBAL_INPUT = "input_global_scales_ind"
LOCAL_OUTPUTS = ("boxes", "features", "scales", "scores")
GLOBAL_OUTPUT = "global_descriptors"
# Order of the official extractor's `prune` call (extractor.py, TF1 branch).
TF1_FEED_ORDER = (
    "input_image",
    "input_scales",
    "input_abs_thres",
    "input_max_feature_num",
    "input_global_scales_ind",
)
TF1_FETCHES = LOCAL_OUTPUTS + (GLOBAL_OUTPUT,)
TF1_PLACEHOLDER_OPS = ("Placeholder", "PlaceholderWithDefault")
TENSOR_SUFFIX = ":0"
# Formats of `RawExtractionFn.model_format` (and of `detect_format`, the SavedModel ones).
FORMAT_TF2 = "tf2"
FORMAT_TF1 = "tf1"
FORMAT_IN_MEMORY = "in_memory"
IMAGE_RANK = 3
IMAGE_CHANNELS = 3


class ModelFormatError(ValueError):
    """The directory is not a DELG SavedModel of a known format."""


def validate_raw_inputs(
    image, scales, max_feature_num, abs_thres, global_scales_ind, check_global=True
):
    """Checks dtypes and ranks before calling a model; returns the converted inputs.

    `check_global=False` skips the range check of `global_scales_ind` (models
    without global outputs ignore it).

    Raises:
      TypeError / ValueError naming the input, what was expected and what was received.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(
            f"input_image must be uint8 RGB [H, W, 3], received dtype {image.dtype}; "
            "convert with np.clip(x, 0, 255).astype(np.uint8) (or load the file "
            "with delg_tf.data.images.load_image_rgb)."
        )
    if image.ndim != IMAGE_RANK or image.shape[-1] != IMAGE_CHANNELS:
        raise ValueError(
            f"input_image must have shape [H, W, 3], received {image.shape}; "
            "pass one RGB image (no batch dimension; grayscale -> stack 3 times)."
        )
    scales = np.asarray(scales, np.float32)
    if scales.ndim != 1 or scales.size == 0 or np.any(scales <= 0):
        raise ValueError(
            f"input_scales must be a non-empty 1-D list of positive floats, "
            f"received {scales.tolist()}."
        )
    max_feature_num = np.asarray(max_feature_num)
    if max_feature_num.ndim != 0 or not np.issubdtype(max_feature_num.dtype, np.integer):
        raise TypeError(
            f"input_max_feature_num must be an integer scalar, received {max_feature_num!r}."
        )
    abs_thres = np.asarray(abs_thres, np.float32)
    if abs_thres.ndim != 0:
        raise ValueError(
            f"input_abs_thres must be a float scalar, received shape {abs_thres.shape}."
        )
    global_scales_ind = np.asarray(global_scales_ind)
    if global_scales_ind.ndim != 1 or (
        global_scales_ind.size and not np.issubdtype(global_scales_ind.dtype, np.integer)
    ):
        raise ValueError(
            f"input_global_scales_ind must be a 1-D list of integers, received "
            f"{global_scales_ind.tolist()}."
        )
    bad = [int(i) for i in global_scales_ind if not 0 <= i < scales.size]
    if bad and check_global:
        raise ValueError(
            f"input_global_scales_ind {global_scales_ind.tolist()} has indices {bad} "
            f"outside [0, {scales.size}) for {scales.size} input_scales."
        )
    return (
        tf.convert_to_tensor(image),
        tf.convert_to_tensor(scales),
        tf.constant(int(max_feature_num), tf.int32),
        tf.convert_to_tensor(abs_thres),
        tf.constant(global_scales_ind.astype(np.int32)),
    )


class RawExtractionFn:
    """Callable giving the official raw outputs of a DELG model.

    Args:
      fn: callable taking keyword tensors named like the official inputs.
      use_local: the model returns local features.
      use_global: the model returns global descriptors.
      model_format: `FORMAT_TF2`, `FORMAT_TF1` or `FORMAT_IN_MEMORY` (informative).
      owner: object kept alive with the function (the loaded SavedModel).
      superglobal: the SuperGlobal modules baked into the model
        (`config.SUPERGLOBAL_MODULES` names; () for the DELG pooling).

    Attributes:
      global_aggregation: how the L2-normalised per-scale global descriptors are
        combined, `config.AGGREGATION_SUM` (official) or `AGGREGATION_MAX`
        (Scale-GeM).
    """

    def __init__(self, fn, use_local, use_global, model_format, owner=None, superglobal=()):
        self._fn = fn
        self.use_local = use_local
        self.use_global = use_global
        self.model_format = model_format
        self._owner = owner
        self.superglobal = tuple(superglobal)
        self.global_aggregation = config_lib.global_aggregation(self.superglobal)

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        image, scales, max_feature_num, abs_thres, global_scales_ind = validate_raw_inputs(
            image,
            scales,
            max_feature_num,
            abs_thres,
            global_scales_ind,
            check_global=self.use_global,
        )
        kwargs = {"input_image": image, "input_scales": scales}
        if self.use_local:
            kwargs.update(input_max_feature_num=max_feature_num, input_abs_thres=abs_thres)
        if self.use_global:
            kwargs[GLOBAL_INPUT] = global_scales_ind
        outputs = self._fn(**kwargs)
        return {k: np.asarray(v) for k, v in outputs.items()}


def from_function(
    fn, use_local=True, use_global=True, model_format=FORMAT_IN_MEMORY, superglobal=()
):
    """Wraps an in-memory function with official input names (e.g. `PyramidExtractor.extract`).

    `superglobal`: the SuperGlobal modules the function computes with (see
    `RawExtractionFn`).
    """
    return RawExtractionFn(fn, use_local, use_global, model_format, superglobal=superglobal)


def read_saved_model_proto(path):
    """Parses DIR/saved_model.pb without loading the model. Returns a SavedModel proto.

    Raises:
      ModelFormatError: no saved_model.pb, not a SavedModel protobuf or no meta graph.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb = Path(path) / SAVED_MODEL_FILE
    if not pb.is_file():
        raise ModelFormatError(
            f"{path} is not a SavedModel directory (no {SAVED_MODEL_FILE}); expected the "
            "directory written by `python -m delg_tf.export` or extracted from an official "
            "DELG tarball (the one holding saved_model.pb and variables/)."
        )
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(pb.read_bytes())
    except Exception as error:  # DecodeError and friends
        raise ModelFormatError(
            f"{pb}: not a SavedModel protobuf ({error}); re-export the "
            "model or re-extract the official tarball."
        ) from error
    if not proto.meta_graphs:
        raise ModelFormatError(
            f"{pb}: the SavedModel has no meta graph; expected a DELG SavedModel."
        )
    return proto


def detect_format(path):
    """`FORMAT_TF2` or `FORMAT_TF1` for a DELG SavedModel directory (read, not loaded).

    `FORMAT_TF2`: an object graph and the `serving_default` signature (delg_tf
    or official TF2 export). `FORMAT_TF1`: a graph whose placeholder nodes are
    named `input_image`, `input_scales`, ... and no usable signature (official
    2020 releases).

    Raises:
      ModelFormatError: the directory is neither.
    """
    meta_graph = read_saved_model_proto(path).meta_graphs[0]
    has_objects = len(meta_graph.object_graph_def.nodes) > 1
    if has_objects and SIGNATURE_DEFAULT in meta_graph.signature_def:
        return FORMAT_TF2
    placeholders = {
        node.name for node in meta_graph.graph_def.node if node.op in TF1_PLACEHOLDER_OPS
    }
    if set(TF1_FEED_ORDER) <= placeholders:
        return FORMAT_TF1
    raise ModelFormatError(
        f"{path}: not a DELG SavedModel. Expected either a {SIGNATURE_DEFAULT!r} signature "
        f"(delg_tf or official TF2 export) or placeholders {sorted(TF1_FEED_ORDER)} "
        f"(official TF1 release); found signatures {sorted(meta_graph.signature_def)} and "
        f"placeholders {sorted(placeholders)[:10]}."
    )


def _tf2_fn(loaded, path, superglobal=()):
    signature = loaded.signatures[SIGNATURE_DEFAULT]
    inputs = set(signature.structured_input_signature[1])
    if IMAGE_INPUT not in inputs:
        raise ModelFormatError(
            f"{path}: serving_default has inputs {sorted(inputs)}, expected the official DELG "
            f"inputs ({IMAGE_INPUT}, {SCALES_INPUT}, ...). Is this a DELG export?"
        )
    use_local = all(name in inputs for name in LOCAL_INPUTS)
    use_global = GLOBAL_INPUT in inputs
    return RawExtractionFn(
        signature, use_local, use_global, FORMAT_TF2, owner=loaded, superglobal=superglobal
    )


def load_tf1_extraction_fn(path):
    """Loads a `FORMAT_TF1` DELG SavedModel, called by tensor names like the official extractor.

    Returns:
      `RawExtractionFn` (local and global outputs).

    Raises:
      ModelFormatError: not a TF1-format DELG SavedModel, or a tensor is missing.
    """
    fmt = detect_format(path)
    if fmt != FORMAT_TF1:
        raise ModelFormatError(
            f"{path}: expected a TF1-format DELG SavedModel (tensor names, no signature), "
            f"received a {fmt.upper()} export. Use load_raw_extraction_fn, which handles "
            "both."
        )
    loaded = tf.saved_model.load(str(path))
    feeds = [name + TENSOR_SUFFIX for name in TF1_FEED_ORDER]
    fetches = [name + TENSOR_SUFFIX for name in TF1_FETCHES]
    try:
        pruned = loaded.prune(feeds=feeds, fetches=fetches)
    except (KeyError, ValueError) as error:
        raise ModelFormatError(
            f"{path}: the TF1 graph lacks a tensor the official extractor needs; expected "
            f"feeds {feeds} and fetches {fetches} ({error})."
        ) from error

    def call(**kwargs):
        outputs = pruned(*[kwargs[name] for name in TF1_FEED_ORDER])
        return dict(zip(TF1_FETCHES, outputs))

    return RawExtractionFn(call, True, True, FORMAT_TF1, owner=loaded)


def load_raw_extraction_fn(path):
    """Loads a DELG SavedModel of any supported format (see the module doc).

    Args:
      path: SavedModel directory.

    Returns:
      `RawExtractionFn` (with the export's SuperGlobal modules, `superglobal`).

    Raises:
      ModelFormatError: not a DELG SavedModel.
      ValueError: its SuperGlobal asset is unreadable (names the file).
    """
    path = str(path)
    if not tf.saved_model.contains_saved_model(path):
        raise ModelFormatError(
            f"{path} is not a SavedModel directory (no saved_model.pb); "
            "expected the directory written by `python -m delg_tf.export` "
            "or an extracted official DELG tarball."
        )
    if detect_format(path) == FORMAT_TF2:
        superglobal = config_lib.read_superglobal_asset(path)
        return _tf2_fn(tf.saved_model.load(path), path, superglobal)
    return load_tf1_extraction_fn(path)
