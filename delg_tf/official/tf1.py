"""Official DELG SavedModels: format detection and the TF1 (tensor-name) calling convention.

The 2020 released DELG models (``r50delg_gld_20200814`` and friends) are TF1
SavedModels without a signature: the official extractor
(``delf/python/extractor.py`` with ``is_tf2_exported: false``) loads them with
``tf.saved_model.load`` and calls ``.prune(feeds, fetches)`` with tensor names.
Models exported with the official TF2 code have a ``serving_default``
signature instead. `detect_format` tells the two apart from the model itself
(a DelfConfig's ``is_tf2_exported`` is only a hint).
"""

import pathlib

import numpy as np

FORMAT_TF1 = "tf1"
FORMAT_TF2 = "tf2"
SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"

# Order of the official extractor's `prune` call (extractor.py, TF1 branch).
FEED_NAMES = ("input_image:0", "input_scales:0", "input_abs_thres:0",
              "input_max_feature_num:0", "input_global_scales_ind:0")
FETCH_NAMES = ("boxes:0", "features:0", "scales:0", "scores:0", "global_descriptors:0")
OUTPUT_KEYS = tuple(name.split(":")[0] for name in FETCH_NAMES)
_PLACEHOLDER_OPS = ("Placeholder", "PlaceholderWithDefault")


class OfficialModelError(ValueError):
    """An official DELG SavedModel cannot be read, called or converted."""


def _saved_model_file(path):
    path = pathlib.Path(path)
    pb = path / SAVED_MODEL_FILE
    if not pb.is_file():
        raise OfficialModelError(
            f"official DELG model: expected a SavedModel directory containing "
            f"{SAVED_MODEL_FILE}, received {str(path)!r} (no such file {str(pb)!r}). "
            f"Pass the directory extracted from the release tarball (the one holding "
            f"saved_model.pb and variables/).")
    return pb


def read_saved_model_proto(path):
    """Parses DIR/saved_model.pb without loading the model. Returns a SavedModel proto."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(_saved_model_file(path).read_bytes())
    except Exception as error:  # DecodeError and friends
        if isinstance(error, OfficialModelError):
            raise
        raise OfficialModelError(
            f"{path}/{SAVED_MODEL_FILE}: not a SavedModel protobuf ({error}). "
            f"Re-extract the official tarball.") from error
    if not proto.meta_graphs:
        raise OfficialModelError(f"{path}/{SAVED_MODEL_FILE}: the SavedModel has no meta graph.")
    return proto


def detect_format(path):
    """Returns "tf2" or "tf1" for an official DELG SavedModel directory.

    "tf2": a SavedModel with an object graph and the ``serving_default``
    signature (official TF2 export). "tf1": a graph whose placeholder nodes are
    named ``input_image``, ``input_scales``, ... and no usable signature
    (official 2020 releases).

    Raises:
      OfficialModelError: if the directory is neither.
    """
    meta_graph = read_saved_model_proto(path).meta_graphs[0]
    has_objects = len(meta_graph.object_graph_def.nodes) > 1
    if has_objects and SERVING_SIGNATURE in meta_graph.signature_def:
        return FORMAT_TF2
    placeholders = {node.name for node in meta_graph.graph_def.node
                    if node.op in _PLACEHOLDER_OPS}
    wanted = {name.split(":")[0] for name in FEED_NAMES}
    if wanted <= placeholders:
        return FORMAT_TF1
    raise OfficialModelError(
        f"{path}: not an official DELG SavedModel. Expected either a "
        f"{SERVING_SIGNATURE!r} signature (TF2 export) or placeholders "
        f"{sorted(wanted)} (TF1 export); found signatures "
        f"{sorted(meta_graph.signature_def)} and placeholders {sorted(placeholders)[:10]}.")


class Tf1ExtractionFunction:
    """Calls a TF1-format DELG SavedModel by tensor names, as the official extractor does.

    Args:
      path: SavedModel directory.
      loaded: the result of ``tf.saved_model.load(path)`` if the caller already
        has it (avoids loading twice).

    Calling it with (image uint8 [H, W, 3], scales f32 [S], max_feature_num int,
    abs_thres float, global_scales_ind int32 [G]) returns a dict of numpy arrays:
    ``boxes`` [N, 4] (ymin, xmin, ymax, xmax in pixels of `image`), ``features``
    [N, D] (raw, not normalised), ``scales`` [N] (1 / pyramid scale), ``scores``
    [N, 1] (attention), ``global_descriptors`` [G, C] (one row per selected scale,
    in increasing scale index).
    """

    use_local = True
    use_global = True

    def __init__(self, path, loaded=None):
        import tensorflow as tf

        self.path = str(path)
        self._loaded = loaded if loaded is not None else tf.saved_model.load(self.path)
        if not hasattr(self._loaded, "prune"):
            raise OfficialModelError(
                f"{path}: loaded as a TF2 object, which has no `prune`; it is not a TF1 "
                f"export. Load it through its {SERVING_SIGNATURE!r} signature instead "
                f"(delg_tf.extraction.raw_model.load_raw_extraction_fn).")
        try:
            self._fn = self._loaded.prune(feeds=list(FEED_NAMES), fetches=list(FETCH_NAMES))
        except (KeyError, ValueError) as error:
            raise OfficialModelError(
                f"{path}: the TF1 graph lacks a tensor the official extractor needs; expected "
                f"feeds {list(FEED_NAMES)} and fetches {list(FETCH_NAMES)} ({error}).") from error

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        import tensorflow as tf

        outputs = self._fn(
            tf.convert_to_tensor(np.asarray(image, np.uint8)),
            tf.convert_to_tensor(np.asarray(scales, np.float32)),
            tf.convert_to_tensor(np.float32(abs_thres)),
            tf.convert_to_tensor(np.int32(max_feature_num)),
            tf.convert_to_tensor(np.asarray(global_scales_ind, np.int32)))
        return {key: value.numpy() for key, value in zip(OUTPUT_KEYS, outputs)}


def load_tf1_extraction_fn(path, loaded=None):
    """Loads a TF1-format official DELG SavedModel. Returns a `Tf1ExtractionFunction`.

    `loaded`: optional ``tf.saved_model.load(path)`` result to reuse.
    """
    fmt = detect_format(path)
    if fmt != FORMAT_TF1:
        raise OfficialModelError(
            f"{path}: expected a TF1-format DELG SavedModel (tensor names, no signature), "
            f"received a {fmt.upper()} export. Use "
            f"delg_tf.extraction.raw_model.load_raw_extraction_fn, which handles both.")
    return Tf1ExtractionFunction(path, loaded=loaded)


class Tf2SignatureFunction:
    """Calls a TF2-format official DELG SavedModel through its ``serving_default`` signature.

    Same call and outputs as `Tf1ExtractionFunction`.
    """

    def __init__(self, path):
        import tensorflow as tf

        self.path = str(path)
        self._loaded = tf.saved_model.load(self.path)
        signatures = getattr(self._loaded, "signatures", {})
        if SERVING_SIGNATURE not in signatures:
            raise OfficialModelError(
                f"{path}: expected a {SERVING_SIGNATURE!r} signature (TF2 export), found "
                f"{sorted(signatures)}.")
        self._fn = signatures[SERVING_SIGNATURE]

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        import tensorflow as tf

        outputs = self._fn(
            input_image=tf.convert_to_tensor(np.asarray(image, np.uint8)),
            input_scales=tf.convert_to_tensor(np.asarray(scales, np.float32)),
            input_max_feature_num=tf.convert_to_tensor(np.int32(max_feature_num)),
            input_abs_thres=tf.convert_to_tensor(np.float32(abs_thres)),
            input_global_scales_ind=tf.convert_to_tensor(np.asarray(global_scales_ind, np.int32)))
        return {key: outputs[key].numpy() for key in OUTPUT_KEYS}


def load_official_raw_fn(path):
    """Raw extraction function of an official DELG SavedModel of either format."""
    if detect_format(path) == FORMAT_TF1:
        return Tf1ExtractionFunction(path)
    return Tf2SignatureFunction(path)
