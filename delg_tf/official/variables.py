"""Reading the variables of an official DELG SavedModel without executing its graph.

Both official formats store their weights as a TF checkpoint at
``DIR/variables/variables``; `tf.train.load_checkpoint` reads it.

* TF1 exports (2020 releases): checkpoint keys are the graph's variable names,
  e.g. ``resnet_v1_50/block3/unit_6/bottleneck_v1/conv2/weights``.
* TF2 exports (official TF2 code): keys follow the object graph and depend on the
  TF version that saved them (TF 2.15 writes ``_model/backbone/l4a/variables/6``
  for nested Keras models). We therefore resolve every key to its *semantic*
  attribute path (``_model/backbone/l4a/conv2b/kernel``) through the
  checkpoint's own ``_CHECKPOINTABLE_OBJECT_GRAPH`` instead of hard-coding
  indices.
"""

import dataclasses
import pathlib

import numpy as np

from delg_tf.extraction.raw_model import FORMAT_TF1, FORMAT_TF2, detect_format

VARIABLES_DIR = "variables"
VARIABLES_PREFIX = "variables"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Object-graph edges that alias a variable through a list (not its own name).
_ALIAS_EDGES = frozenset(
    {
        "keras_api",
        "variables",
        "trainable_variables",
        "non_trainable_variables",
        "layers",
        "_variables",
        "_trainable_variables",
        "_non_trainable_variables",
        "_self_unconditional_checkpoint_dependencies",
        "signatures",
    }
)
# Deep enough for _model/backbone/l4a/conv2b/kernel plus Keras wrappers.
_MAX_OBJECT_DEPTH = 12


class OfficialModelError(ValueError):
    """An official DELG SavedModel cannot be read, mapped or converted.

    (Directories that are not DELG SavedModels at all raise
    `delg_tf.extraction.raw_model.ModelFormatError`.)
    """


@dataclasses.dataclass
class OfficialVariables:
    """Float variables of an official DELG SavedModel.

    Attributes:
      path: the SavedModel directory.
      format: "tf1" or "tf2".
      tensors: {name: float32 array}. TF1: the variable name (checkpoint key).
        TF2: the semantic attribute path below the export module, e.g.
        ``_model/backbone/l4a/conv2b/kernel``.
      checkpoint_keys: {name: checkpoint key it was read from}.
    """

    path: str
    format: str
    tensors: dict
    checkpoint_keys: dict

    def shapes(self):
        return {name: tuple(value.shape) for name, value in self.tensors.items()}


def checkpoint_prefix(path):
    """DIR/variables/variables, checked to exist."""
    prefix = pathlib.Path(path) / VARIABLES_DIR / VARIABLES_PREFIX
    if not pathlib.Path(str(prefix) + ".index").is_file():
        raise OfficialModelError(
            f"official DELG model {str(path)!r}: expected the checkpoint "
            f"{str(prefix)}.index next to saved_model.pb; it is missing. Extract the whole "
            f"release tarball (saved_model.pb and the variables/ folder)."
        )
    return str(prefix)


def semantic_paths_from_object_graph(object_graph_bytes):
    """Maps checkpoint keys to their named attribute path in a TrackableObjectGraph.

    Among all paths reaching a variable, the shortest one made only of
    attribute names (no list indices, no ``keras_api``/``variables`` aliases)
    is chosen.

    Returns:
      {checkpoint_key: "a/b/c"}; variables without a named path are absent.
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(object_graph_bytes)
    best = {}
    stack = [(0, ())]
    visited = set()
    while stack:
        node_id, path = stack.pop()
        if (node_id, path) in visited or len(path) > _MAX_OBJECT_DEPTH:
            continue
        visited.add((node_id, path))
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            key = attribute.checkpoint_key
            if key.endswith(VARIABLE_VALUE_SUFFIX):
                name = "/".join(path)
                if key not in best or len(path) < best[key].count("/") + 1:
                    best[key] = name
        for child in node.children:
            name = child.local_name
            if name.isdigit() or name in _ALIAS_EDGES:
                continue
            stack.append((child.node_id, path + (name,)))
    return best


def read_official_variables(path, fmt=None):
    """Reads the float variables of an official DELG SavedModel.

    Args:
      path: SavedModel directory (``saved_model.pb`` + ``variables/``).
      fmt: "tf1" / "tf2" (`raw_model.FORMAT_TF1` / `FORMAT_TF2`), or None to detect it
        from the model (`raw_model.detect_format`).

    Returns:
      An `OfficialVariables`.
    """
    import tensorflow as tf

    fmt = fmt or detect_format(path)
    prefix = checkpoint_prefix(path)
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    float_keys = sorted(key for key, dtype in dtypes.items() if dtype.is_floating)
    names = {key: key for key in float_keys}
    if fmt == FORMAT_TF2:
        if OBJECT_GRAPH_KEY not in dtypes:
            raise OfficialModelError(
                f"{prefix}: a TF2 checkpoint must contain {OBJECT_GRAPH_KEY}; it does not. "
                f"Re-export the model with tf.saved_model.save."
            )
        semantic = semantic_paths_from_object_graph(reader.get_tensor(OBJECT_GRAPH_KEY))
        for key in float_keys:
            names[key] = semantic.get(key, key.replace(VARIABLE_VALUE_SUFFIX, ""))
    elif fmt != FORMAT_TF1:
        raise OfficialModelError(f"fmt must be 'tf1', 'tf2' or None, received {fmt!r}.")
    tensors, keys = {}, {}
    for key in float_keys:
        name = names[key]
        if name in tensors:
            raise OfficialModelError(
                f"{prefix}: two checkpoint keys resolve to the variable {name!r} "
                f"({keys[name]!r} and {key!r})."
            )
        tensors[name] = np.asarray(reader.get_tensor(key))
        keys[name] = key
    return OfficialVariables(path=str(path), format=fmt, tensors=tensors, checkpoint_keys=keys)
