"""Maps the variables of an official DELG SavedModel onto a delg_tf `DelgModel`.

Targets are paths relative to the model (``resnet/conv4_block6/2/bn/gamma``,
``attention/conv1/kernel``, ``whitening/kernel``, ...), i.e. Keras
``Variable.path`` without the model's own name.

* TF1 (tf-slim) names: ``resnet_v1_50/block{b}/unit_{u}/bottleneck_v1/conv{1,2,3}``
  -> ``resnet/conv{b+1}_block{u}/{1,2,3}`` (``shortcut`` -> ``0``), slim
  ``weights``/``biases``/``BatchNorm/*`` -> ``conv/kernel``/``conv/bias``/``bn/*``.
  Heads by the scope names of the official slim DELF code where known
  (``attention_block/attention/compute/conv{1,2}``) and by guess otherwise
  (``autoencoder/{encoder,decoder}``, ``whitening``).
* TF2 (official Keras code) names, resolved through the object graph:
  ``_model/backbone/l{stage}{a,b,...}/{conv2a,conv2b,conv2c,conv_shortcut}``
  and ``bn2a, ...``, ``_model/backbone/{conv1,bn_conv1,embedding_layer}``,
  ``_model/attention/{conv1,bn_conv1,conv2}``, ``_model/autoencoder/{conv1,conv2}``.
* Head variables whose scope is not known are assigned by role and shape: each
  unmatched source layer (kernel [+ bias] [+ batch norm]) is matched to the one
  unfilled head layer with the same kernel shape and the same bias / batch-norm
  structure.

Every target must be filled with an array of the same shape, and every source
variable must be used or be a known training-only extra (optimizer slots,
step counters, classifiers); otherwise `map_official_variables` raises
`MappingError` listing what did not fit.
"""

import dataclasses
import re

from delg_tf.extraction.raw_model import FORMAT_TF1, FORMAT_TF2
from delg_tf.official.variables import OfficialModelError

# Stage names of delg_tf's ResNet: slim block{b} / TF2 l{b+1} -> conv{b+1}.
SLIM_FIRST_STAGE = 2
SLIM_BN_LEAVES = {
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "moving_mean",
    "moving_variance": "moving_variance",
}
SLIM_CONV_LEAVES = {"weights": "kernel", "biases": "bias"}
SLIM_UNIT_CONVS = {"conv1": "1", "conv2": "2", "conv3": "3", "shortcut": "0"}
TF2_UNIT_CONVS = {"conv2a": "1", "conv2b": "2", "conv2c": "3", "conv_shortcut": "0"}
TF2_UNIT_BNS = {"bn2a": "1", "bn2b": "2", "bn2c": "3", "bn_shortcut": "0"}
TF2_EXPORT_PREFIX = "_model/"

# Head layers of DelgModel (target layer -> kernel/bias/bn leaves).
HEAD_LAYERS = {
    "attention/conv1": ("attention/conv1", "attention/bn_conv1"),
    "attention/conv2": ("attention/conv2", None),
    "autoencoder/conv1": ("autoencoder/conv1", None),
    "autoencoder/conv2": ("autoencoder/conv2", None),
    "whitening": ("whitening", None),
}
# Known head scopes of the official models (source layer prefix -> target layer).
TF1_HEAD_SCOPES = {
    "attention_block/attention/compute/conv1": "attention/conv1",
    "attention_block/attention/compute/conv2": "attention/conv2",
    "autoencoder/encoder": "autoencoder/conv1",
    "autoencoder/decoder": "autoencoder/conv2",
    "whitening": "whitening",
}
TF2_HEAD_SCOPES = {
    "attention/conv1": "attention/conv1",
    "attention/bn_conv1": "attention/bn_conv1",
    "attention/conv2": "attention/conv2",
    "autoencoder/conv1": "autoencoder/conv1",
    "autoencoder/conv2": "autoencoder/conv2",
    "backbone/embedding_layer": "whitening",
}
GEM_POWER_TARGET = "gem/power"
# Source variables that exist only for training; they are reported, not converted.
IGNORED_SOURCE_PATTERNS = (
    r"(^|/)global_step$",
    r"(^|/)save_counter$",
    r"(^|/)Momentum(_\d+)?$",
    r"(^|/)Adam(_\d+)?$",
    r"ExponentialMovingAverage",
    r"(^|/)optimizer/",
    r"(^|/)cosine_weights$",
    r"(^|/)scale_factor$",
    r"(^|/)attn_classification/",
    r"(^|/)att_fc/",
    r"(^|/)logits/",
    r"(^|/)desc_fc/",
    r"(^|/)classifier/",
)
MAX_PROBLEMS_SHOWN = 40
LAYOUT_FOR_FORMAT = {FORMAT_TF1: "slim", FORMAT_TF2: "tf2_delf"}


class MappingError(OfficialModelError):
    """Official variables do not fit the delg_tf model."""


@dataclasses.dataclass
class VariableMapping:
    """Result of `map_official_variables`.

    Attributes:
      assignments: {target path: (source name, how)}; how is "name" or
        "role+shape".
      ignored: source names deliberately not converted (training-only extras).
    """

    assignments: dict
    ignored: list

    def describe(self, sources=None):
        """Human-readable mapping, one line per target."""
        lines = []
        for target in sorted(self.assignments):
            source, how = self.assignments[target]
            shape = "" if sources is None else f" {list(sources[source].shape)}"
            lines.append(f"  {source}{shape} -> {target} (by {how})")
        for name in self.ignored:
            lines.append(f"  {name}: ignored (training-only)")
        return "\n".join(lines)


def _stage_unit_from_letter(letter):
    return ord(letter) - ord("a") + 1


def tf1_slim_target(name):
    """Target path of one tf-slim variable name, or None if it is not a known name."""
    match = re.fullmatch(r"resnet_v1_\d+/conv1/(weights|biases|BatchNorm/\w+)", name)
    if match:
        return "resnet/conv1/" + _slim_leaf(match.group(1))
    match = re.fullmatch(
        r"resnet_v1_\d+/block(\d+)/unit_(\d+)/bottleneck_v1/(conv1|conv2|conv3|shortcut)/"
        r"(weights|biases|BatchNorm/\w+)",
        name,
    )
    if match:
        block, unit, conv, leaf = match.groups()
        stage = int(block) + SLIM_FIRST_STAGE - 1
        return f"resnet/conv{stage}_block{int(unit)}/{SLIM_UNIT_CONVS[conv]}/" + _slim_leaf(leaf)
    for scope, layer in TF1_HEAD_SCOPES.items():
        match = re.fullmatch(re.escape(scope) + r"/(weights|biases|BatchNorm/\w+)", name)
        if match:
            return _head_leaf(layer, match.group(1))
    return None


def _slim_leaf(leaf):
    if leaf.startswith("BatchNorm/"):
        return "bn/" + SLIM_BN_LEAVES.get(leaf.split("/", 1)[1], leaf)
    return "conv/" + SLIM_CONV_LEAVES[leaf]


def _head_leaf(layer, leaf):
    """Head layer + slim/Keras leaf -> target path (BN goes to the layer's BN)."""
    kernel_layer, bn_layer = HEAD_LAYERS[layer]
    if leaf.startswith("BatchNorm/"):
        if bn_layer is None:
            return None
        return f"{bn_layer}/{SLIM_BN_LEAVES.get(leaf.split('/', 1)[1], leaf)}"
    leaf = SLIM_CONV_LEAVES.get(leaf, leaf)
    return f"{kernel_layer}/{leaf}"


def tf2_keras_target(name):
    """Target path of one TF2 official variable (semantic object path), or None."""
    if name.startswith(TF2_EXPORT_PREFIX):
        name = name[len(TF2_EXPORT_PREFIX) :]
    match = re.fullmatch(r"backbone/conv1/(kernel|bias)", name)
    if match:
        return "resnet/conv1/conv/" + match.group(1)
    match = re.fullmatch(r"backbone/bn_conv1/(\w+)", name)
    if match:
        return "resnet/conv1/bn/" + match.group(1)
    match = re.fullmatch(r"backbone/l(\d)([a-z])/(\w+)/(\w+)", name)
    if match:
        stage, letter, layer, leaf = match.groups()
        unit = _stage_unit_from_letter(letter)
        if layer in TF2_UNIT_CONVS:
            return f"resnet/conv{stage}_block{unit}/{TF2_UNIT_CONVS[layer]}/conv/{leaf}"
        if layer in TF2_UNIT_BNS:
            return f"resnet/conv{stage}_block{unit}/{TF2_UNIT_BNS[layer]}/bn/{leaf}"
        return None
    for scope, layer in TF2_HEAD_SCOPES.items():
        match = re.fullmatch(re.escape(scope) + r"/(\w+)", name)
        if match:
            return f"{layer}/{match.group(1)}"
    return None


def _is_ignored(name):
    return any(re.search(pattern, name) for pattern in IGNORED_SOURCE_PATTERNS)


def _source_layers(names):
    """Groups source names into layers: {layer scope: {leaf: name}} (BN folded in)."""
    layers = {}
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-2] in ("BatchNorm", "batch_norm"):
            scope, leaf = "/".join(parts[:-2]), "bn/" + parts[-1]
        elif len(parts) >= 2:
            scope, leaf = "/".join(parts[:-1]), parts[-1]
        else:
            scope, leaf = "", parts[-1]
        leaf = {"weights": "kernel", "biases": "bias"}.get(leaf, leaf)
        layers.setdefault(scope, {})[leaf] = name
    return layers


def _target_layer_signature(layer, targets):
    kernel_layer, bn_layer = HEAD_LAYERS[layer]
    kernel = targets.get(f"{kernel_layer}/kernel")
    if kernel is None:
        return None
    has_bias = f"{kernel_layer}/bias" in targets
    has_bn = bn_layer is not None and f"{bn_layer}/gamma" in targets
    return tuple(kernel), has_bias, has_bn


def _assign_heads_by_role(unmatched, sources, targets, assignments):
    """Role + shape assignment of head layers left unfilled by name."""
    open_layers = {}
    for layer in HEAD_LAYERS:
        kernel_layer, _ = HEAD_LAYERS[layer]
        if f"{kernel_layer}/kernel" in targets and f"{kernel_layer}/kernel" not in assignments:
            open_layers[layer] = _target_layer_signature(layer, targets)
    if not open_layers:
        return unmatched
    remaining = set(unmatched)
    for scope, leaves in sorted(_source_layers(unmatched).items()):
        if "kernel" not in leaves:
            continue
        signature = (tuple(sources[leaves["kernel"]].shape), "bias" in leaves, "bn/gamma" in leaves)
        candidates = [layer for layer, sig in open_layers.items() if sig == signature]
        if len(candidates) != 1:
            continue
        layer = candidates[0]
        kernel_layer, bn_layer = HEAD_LAYERS[layer]
        for leaf, name in leaves.items():
            if leaf.startswith("bn/"):
                target = f"{bn_layer}/{leaf[3:]}"
            else:
                target = f"{kernel_layer}/{leaf}"
            if target in targets and target not in assignments:
                assignments[target] = (name, "role+shape")
                remaining.discard(name)
        del open_layers[layer]
    return sorted(remaining)


def map_official_variables(sources, fmt, targets):
    """Maps official variables onto target variables.

    Args:
      sources: {source name: array} (`OfficialVariables.tensors`).
      fmt: "tf1" or "tf2".
      targets: {target path: shape} of the delg_tf model variables to fill
        (see `model_targets`). An optional ``gem/power`` target is filled only
        if the source has a GeM power variable.

    Returns:
      A `VariableMapping`.

    Raises:
      MappingError: listing unmatched source variables, unfilled targets and
        shape mismatches (expected vs received) together.
    """
    name_fn = {FORMAT_TF1: tf1_slim_target, FORMAT_TF2: tf2_keras_target}.get(fmt)
    if name_fn is None:
        raise MappingError(f"format must be 'tf1' or 'tf2', received {fmt!r}.")
    assignments, unmatched, ignored = {}, [], []
    for name in sorted(sources):
        target = name_fn(name)
        if (
            target is None
            and re.search(r"(^|/|_)(gem|power)(/|_|$)", name, re.IGNORECASE)
            and sources[name].size == 1
        ):
            target = GEM_POWER_TARGET
        if target is not None and target in targets:
            if target in assignments:
                raise MappingError(
                    f"two official variables map to {target}: "
                    f"{assignments[target][0]!r} and {name!r}."
                )
            assignments[target] = (name, "name")
        elif _is_ignored(name):
            ignored.append(name)
        else:
            unmatched.append(name)
    unmatched = _assign_heads_by_role(unmatched, sources, targets, assignments)

    problems = []
    for target, (name, _) in sorted(assignments.items()):
        expected = tuple(targets[target])
        received = tuple(sources[name].shape)
        if target == GEM_POWER_TARGET:
            received = () if sources[name].size == 1 else received
        if expected != received:
            problems.append(
                f"  shape mismatch: {name} has shape {list(received)}, "
                f"{target} expects {list(expected)}"
            )
    unfilled = sorted(t for t in targets if t not in assignments and t != GEM_POWER_TARGET)
    problems += [
        f"  unmatched official variable: {name} {list(sources[name].shape)}" for name in unmatched
    ]
    problems += [
        f"  delg_tf variable left unfilled: {target} {list(targets[target])}" for target in unfilled
    ]
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"  ... and {len(problems) - len(shown)} more")
        raise MappingError(
            f"the official {fmt.upper()} variables do not fit the delg_tf DELG model "
            f"({len(assignments)} mapped, {len(problems)} problems):\n"
            + "\n".join(shown)
            + "\nCheck --backbone (r50/r101) and that the model is an official DELG export "
            "(backbone + attention + autoencoder + whitening); nothing was written."
        )
    return VariableMapping(assignments=assignments, ignored=ignored)


def relative_path(model, variable):
    """Variable path without the model's own name (``delg/resnet/...`` -> ``resnet/...``)."""
    prefix = model.name + "/"
    path = variable.path
    return path[len(prefix) :] if path.startswith(prefix) else path


def model_targets(model):
    """{relative path: shape} of the converted variables of a built `DelgModel`.

    Classifier heads (`cosine_classifier`, `attention_classifier`) are not part
    of an official export and are excluded.
    """
    excluded = ("cosine_classifier/", "attention_classifier/")
    targets = {}
    for variable in model.variables:
        path = relative_path(model, variable)
        if path.startswith(excluded):
            continue
        targets[path] = tuple(variable.shape)
    return targets


def assign_to_model(model, mapping, sources):
    """Copies the mapped arrays into the model's variables. Returns the number assigned."""
    by_path = {relative_path(model, variable): variable for variable in model.variables}
    for target, (name, _) in mapping.assignments.items():
        value = sources[name]
        variable = by_path[target]
        variable.assign(value.reshape(tuple(variable.shape)).astype(variable.dtype))
    return len(mapping.assignments)


def infer_depth(sources, fmt):
    """ResNet depth (50 or 101) from the number of conv4 units, or None if unknown."""
    units = set()
    for name in sources:
        if fmt == FORMAT_TF1:
            match = re.search(r"/block3/unit_(\d+)/", name)
            if match:
                units.add(int(match.group(1)))
        else:
            match = re.search(r"backbone/l4([a-z])/", name)
            if match:
                units.add(_stage_unit_from_letter(match.group(1)))
    return {6: 50, 23: 101}.get(max(units)) if units else None
