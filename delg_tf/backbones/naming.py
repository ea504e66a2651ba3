"""Weight-name mappings of the ResNet backbone, as pure functions.

Our key of a backbone weight is its path relative to the backbone model:

* stem: ``conv1/conv/kernel``, ``conv1/conv/bias``, ``conv1/bn/{gamma,beta,moving_mean,
  moving_variance}``;
* unit u (1-based) of stage s (2..5), convolution k (1..3; 0 is the projection
  shortcut): ``conv{s}_block{u}/{k}/conv/kernel``, ``.../{k}/bn/gamma``, ...

Mapped to:

* tf-slim ``resnet_v1_50`` / ``resnet_v1_101`` checkpoints (the ImageNet
  ``resnet_v1_50.ckpt`` and the backbone of the released TF1 DELG models):
  ``{scope}/conv1/weights``, ``{scope}/conv1/BatchNorm/gamma``,
  ``{scope}/block{s-1}/unit_{u}/bottleneck_v1/conv{k}/weights`` (k = 0:
  ``shortcut``), ``.../BatchNorm/{gamma,beta,moving_mean,moving_variance}``. Slim
  convolutions before batch norm have no bias, so conv biases map to None.
* ``keras.applications`` ResNet50/101 layers: ``conv1_conv``, ``conv1_bn``,
  ``conv{s}_block{u}_{k}_conv``, ``conv{s}_block{u}_{k}_bn`` with the same weight
  names (kernel, bias, gamma, beta, moving_mean, moving_variance).
"""

import re

SLIM_SCOPES = {50: "resnet_v1_50", 101: "resnet_v1_101"}
SLIM_BN_SCOPE = "BatchNorm"
SLIM_KERNEL = "weights"
SLIM_SHORTCUT = "shortcut"
SLIM_UNIT_SCOPE = "bottleneck_v1"
STEM = "conv1"
SHORTCUT_INDEX = 0
# Our stage s (conv2..conv5) is slim's block{s - 1}.
SLIM_BLOCK_OFFSET = 1
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
CONV_WEIGHTS = ("kernel", "bias")

_KEY_RE = re.compile(
    r"^(?:(?P<stem>conv1)|conv(?P<stage>[2-5])_block(?P<unit>\d+)/(?P<conv>[0-3]))"
    r"/(?P<part>conv|bn)/(?P<weight>kernel|bias|gamma|beta|moving_mean|moving_variance)$"
)
_SLIM_RE = re.compile(
    r"^(?P<scope>[^/]+)/(?:(?P<stem>conv1)|block(?P<block>\d+)/unit_(?P<unit>\d+)/"
    r"bottleneck_v1/(?P<conv>conv[1-3]|shortcut))"
    r"/(?:(?P<kernel>weights)|BatchNorm/(?P<bn>gamma|beta|moving_mean|moving_variance))$"
)


def parse_key(key):
    """Splits one of our keys into (stage, unit, conv, part, weight).

    stage is 1 for the stem (unit and conv are None), 2..5 otherwise; part is
    "conv" or "bn". Raises ValueError for a key outside the scheme.
    """
    match = _KEY_RE.match(key)
    if match is None:
        raise ValueError(
            f"not a backbone weight key: {key!r}; expected e.g. "
            f"'conv1/conv/kernel' or 'conv4_block6/2/bn/gamma'."
        )
    if match["stem"]:
        return 1, None, None, match["part"], match["weight"]
    return (
        int(match["stage"]),
        int(match["unit"]),
        int(match["conv"]),
        match["part"],
        match["weight"],
    )


def make_key(stage, unit, conv, part, weight):
    """Inverse of `parse_key`."""
    prefix = STEM if stage == 1 else f"conv{stage}_block{unit}/{conv}"
    return f"{prefix}/{part}/{weight}"


def relative_key(variable_path, backbone_name):
    """Our key from a variable path such as 'delg/resnet/conv1/conv/kernel'."""
    marker = f"{backbone_name}/"
    index = variable_path.find(marker)
    if index < 0:
        raise ValueError(f"variable {variable_path!r} is not under backbone {backbone_name!r}.")
    return variable_path[index + len(marker) :]


def slim_scope(depth):
    """'resnet_v1_50' or 'resnet_v1_101'."""
    if depth not in SLIM_SCOPES:
        raise ValueError(
            f"tf-slim ResNet depth must be one of {sorted(SLIM_SCOPES)}, received {depth!r}."
        )
    return SLIM_SCOPES[depth]


def key_to_slim(key, scope):
    """tf-slim checkpoint name of our key, or None (conv biases do not exist in slim)."""
    stage, unit, conv, part, weight = parse_key(key)
    if part == "conv":
        if weight == "bias":
            return None
        leaf = SLIM_KERNEL
    else:
        leaf = f"{SLIM_BN_SCOPE}/{weight}"
    if stage == 1:
        return f"{scope}/{STEM}/{leaf}"
    conv_scope = SLIM_SHORTCUT if conv == SHORTCUT_INDEX else f"conv{conv}"
    return (
        f"{scope}/block{stage - SLIM_BLOCK_OFFSET}/unit_{unit}/{SLIM_UNIT_SCOPE}/"
        f"{conv_scope}/{leaf}"
    )


def slim_to_key(name):
    """Our key of a tf-slim backbone name (scope ignored), or None if not a backbone weight."""
    match = _SLIM_RE.match(name)
    if match is None:
        return None
    part, weight = ("conv", "kernel") if match["kernel"] else ("bn", match["bn"])
    if match["stem"]:
        return make_key(1, None, None, part, weight)
    conv = SHORTCUT_INDEX if match["conv"] == SLIM_SHORTCUT else int(match["conv"][-1])
    return make_key(int(match["block"]) + SLIM_BLOCK_OFFSET, int(match["unit"]), conv, part, weight)


def key_to_keras_applications(key):
    """(layer name, weight name) in keras.applications ResNet50/101 for our key."""
    stage, unit, conv, part, weight = parse_key(key)
    layer = f"{STEM}_{part}" if stage == 1 else f"conv{stage}_block{unit}_{conv}_{part}"
    return layer, weight


def keras_applications_to_key(layer_name, weight_name):
    """Inverse of `key_to_keras_applications`; None for layers without weights of ours."""
    match = re.match(r"^(?:(conv1)|conv([2-5])_block(\d+)_([0-3]))_(conv|bn)$", layer_name)
    if match is None or weight_name not in CONV_WEIGHTS + BN_WEIGHTS:
        return None
    if match.group(1):
        return make_key(1, None, None, match.group(5), weight_name)
    return make_key(
        int(match.group(2)), int(match.group(3)), int(match.group(4)), match.group(5), weight_name
    )
