"""Uniform access to the raw extraction function of a DELG SavedModel.

`load_raw_extraction_fn(path)` returns a `RawExtractionFn`: a callable
`(image, scales, max_feature_num, abs_thres, global_scales_ind) -> dict` with
the official raw outputs (`boxes`, `features`, `scales`, `scores`,
`global_descriptors`, whichever the model has), for every DELG format:

* TF2 exports (official TF2 code or delg_tf): the `serving_default` signature
  with the official input names; the variant (local+global, local, global) is
  read from its inputs.
* TF1 exports (the 2020 released models): no signature, called by tensor names
  (`input_image:0` ... -> `boxes:0` ...) via `.prune`, as the official
  extractor does. If `delg_tf.official.tf1.load_tf1_extraction_fn` exists it is
  used; otherwise a built-in pruning loader with the same behaviour.

The format is detected from the model itself, never from a config flag.
"""

import numpy as np
import tensorflow as tf

SIGNATURE_DEFAULT = "serving_default"
IMAGE_INPUT = "input_image"
LOCAL_INPUTS = ("input_max_feature_num", "input_abs_thres")
GLOBAL_INPUT = "input_global_scales_ind"
LOCAL_OUTPUTS = ("boxes", "features", "scales", "scores")
GLOBAL_OUTPUT = "global_descriptors"
TF1_FEED_ORDER = ("input_image", "input_scales", "input_abs_thres", "input_max_feature_num",
                  "input_global_scales_ind")
TF1_FETCHES = LOCAL_OUTPUTS + (GLOBAL_OUTPUT,)
FORMAT_TF2 = "tf2_signature"
FORMAT_TF1 = "tf1_tensor_names"
IMAGE_RANK = 3
IMAGE_CHANNELS = 3


class ModelFormatError(ValueError):
    """The directory is not a DELG SavedModel of a known format."""


def validate_raw_inputs(image, scales, max_feature_num, abs_thres, global_scales_ind,
                        check_global=True):
    """Checks dtypes and ranks before calling a model; returns the converted inputs.

    `check_global=False` skips the range check of `global_scales_ind` (models
    without global outputs ignore it).

    Raises:
      TypeError / ValueError naming the input, what was expected and what was received.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"input_image must be uint8 RGB [H, W, 3], received dtype {image.dtype}; "
                        "convert with np.clip(x, 0, 255).astype(np.uint8) (or load the file "
                        "with delg_tf.data.images.load_image_rgb).")
    if image.ndim != IMAGE_RANK or image.shape[-1] != IMAGE_CHANNELS:
        raise ValueError(f"input_image must have shape [H, W, 3], received {image.shape}; "
                         "pass one RGB image (no batch dimension; grayscale -> stack 3 times).")
    scales = np.asarray(scales, np.float32)
    if scales.ndim != 1 or scales.size == 0 or np.any(scales <= 0):
        raise ValueError(f"input_scales must be a non-empty 1-D list of positive floats, "
                         f"received {scales.tolist()}.")
    max_feature_num = np.asarray(max_feature_num)
    if max_feature_num.ndim != 0 or not np.issubdtype(max_feature_num.dtype, np.integer):
        raise TypeError(f"input_max_feature_num must be an integer scalar, received "
                        f"{max_feature_num!r}.")
    abs_thres = np.asarray(abs_thres, np.float32)
    if abs_thres.ndim != 0:
        raise ValueError(f"input_abs_thres must be a float scalar, received shape "
                         f"{abs_thres.shape}.")
    global_scales_ind = np.asarray(global_scales_ind)
    if global_scales_ind.ndim != 1 or (global_scales_ind.size
                                       and not np.issubdtype(global_scales_ind.dtype,
                                                             np.integer)):
        raise ValueError(f"input_global_scales_ind must be a 1-D list of integers, received "
                         f"{global_scales_ind.tolist()}.")
    bad = [int(i) for i in global_scales_ind if not 0 <= i < scales.size]
    if bad and check_global:
        raise ValueError(f"input_global_scales_ind {global_scales_ind.tolist()} has indices {bad} "
                         f"outside [0, {scales.size}) for {scales.size} input_scales.")
    return (tf.convert_to_tensor(image), tf.convert_to_tensor(scales),
            tf.constant(int(max_feature_num), tf.int32), tf.convert_to_tensor(abs_thres),
            tf.constant(global_scales_ind.astype(np.int32)))


class RawExtractionFn:
    """Callable giving the official raw outputs of a DELG model.

    Args:
      fn: callable taking keyword tensors named like the official inputs.
      use_local: the model returns local features.
      use_global: the model returns global descriptors.
      model_format: `FORMAT_TF2` or `FORMAT_TF1` (informative).
      owner: object kept alive with the function (the loaded SavedModel).
    """

    def __init__(self, fn, use_local, use_global, model_format, owner=None):
        self._fn = fn
        self.use_local = use_local
        self.use_global = use_global
        self.model_format = model_format
        self._owner = owner

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        image, scales, max_feature_num, abs_thres, global_scales_ind = validate_raw_inputs(
            image, scales, max_feature_num, abs_thres, global_scales_ind,
            check_global=self.use_global)
        kwargs = {"input_image": image, "input_scales": scales}
        if self.use_local:
            kwargs.update(input_max_feature_num=max_feature_num, input_abs_thres=abs_thres)
        if self.use_global:
            kwargs[GLOBAL_INPUT] = global_scales_ind
        outputs = self._fn(**kwargs)
        return {k: np.asarray(v) for k, v in outputs.items()}


def from_function(fn, use_local=True, use_global=True, model_format="in_memory"):
    """Wraps an in-memory function with official input names (e.g. `PyramidExtractor.extract`)."""
    return RawExtractionFn(fn, use_local, use_global, model_format)


def _tf2_fn(loaded, path):
    signature = loaded.signatures[SIGNATURE_DEFAULT]
    inputs = set(signature.structured_input_signature[1])
    if IMAGE_INPUT not in inputs:
        raise ModelFormatError(
            f"{path}: serving_default has inputs {sorted(inputs)}, expected the official DELG "
            f"inputs ({IMAGE_INPUT}, input_scales, ...). Is this a DELG export?")
    use_local = all(name in inputs for name in LOCAL_INPUTS)
    use_global = GLOBAL_INPUT in inputs
    return RawExtractionFn(signature, use_local, use_global, FORMAT_TF2, owner=loaded)


def _builtin_tf1_fn(loaded, path):
    """Prunes a TF1 SavedModel by tensor names (what the official extractor does)."""
    graph = loaded.graph if hasattr(loaded, "graph") else None
    names = set()
    if graph is not None:
        names = {op.name for op in graph.get_operations()}
    use_local = all(n in names for n in LOCAL_OUTPUTS + LOCAL_INPUTS) if names else True
    use_global = (GLOBAL_OUTPUT in names and GLOBAL_INPUT in names) if names else True
    if not (use_local or use_global):
        raise ModelFormatError(
            f"{path}: no serving_default signature and no DELG tensor names (input_image:0, "
            "boxes:0 / global_descriptors:0); expected an official DELG SavedModel.")
    feeds = [n + ":0" for n in TF1_FEED_ORDER
             if n in ("input_image", "input_scales")
             or (use_local and n in LOCAL_INPUTS) or (use_global and n == GLOBAL_INPUT)]
    fetches = [n + ":0" for n in TF1_FETCHES
               if (use_local and n in LOCAL_OUTPUTS) or (use_global and n == GLOBAL_OUTPUT)]
    pruned = loaded.prune(feeds=feeds, fetches=fetches)
    feed_names = [f[:-2] for f in feeds]
    fetch_names = [f[:-2] for f in fetches]

    def call(**kwargs):
        outputs = pruned(*[kwargs[name] for name in feed_names])
        return dict(zip(fetch_names, outputs))

    return RawExtractionFn(call, use_local, use_global, FORMAT_TF1, owner=loaded)


def load_raw_extraction_fn(path):
    """Loads a DELG SavedModel of any supported format (see the module doc).

    Args:
      path: SavedModel directory.

    Returns:
      `RawExtractionFn`.

    Raises:
      ModelFormatError: not a DELG SavedModel.
    """
    path = str(path)
    if not tf.saved_model.contains_saved_model(path):
        raise ModelFormatError(f"{path} is not a SavedModel directory (no saved_model.pb); "
                               "expected the directory written by `python -m delg_tf.export` "
                               "or an extracted official DELG tarball.")
    if SIGNATURE_DEFAULT in _signature_names(path):
        return _tf2_fn(tf.saved_model.load(path), path)
    try:
        from delg_tf.official.tf1 import load_tf1_extraction_fn
    except ImportError:
        return _builtin_tf1_fn(tf.saved_model.load(path), path)
    fn = load_tf1_extraction_fn(path)
    if isinstance(fn, RawExtractionFn):
        return fn
    return RawExtractionFn(
        lambda **kw: fn(kw["input_image"], kw["input_scales"], kw.get("input_max_feature_num"),
                        kw.get("input_abs_thres"), kw.get(GLOBAL_INPUT)),
        getattr(fn, "use_local", True), getattr(fn, "use_global", True), FORMAT_TF1, owner=fn)


def _signature_names(path):
    """Signature names of the first meta graph, read without loading the model."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(tf.io.gfile.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    if not proto.meta_graphs:
        raise ModelFormatError(f"{path}/saved_model.pb has no meta graph; expected a DELG "
                               "SavedModel.")
    return set(proto.meta_graphs[0].signature_def)
