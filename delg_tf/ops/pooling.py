"""Global pooling of feature maps as small pure functions.

Each takes a feature map [B, H, W, C] and returns [B, C]. References:
SPoC (Babenko & Lempitsky, ICCV 2015), MAC (Tolias et al., ICLR 2016),
GeM (Radenovic et al., TPAMI 2018; DELG uses p=3).
"""

import tensorflow as tf

GEM_DEFAULT_POWER = 3.0
GEM_CLAMP_EPSILON = 1e-6  # Activations are clipped below at this value before x^p.
SPATIAL_AXES = (1, 2)


def spoc(x):
    """Sum-pooling of convolutions, as average pooling: mean over H, W."""
    return tf.reduce_mean(x, axis=SPATIAL_AXES)


def mac(x):
    """Maximum activations of convolutions: max over H, W."""
    return tf.reduce_max(x, axis=SPATIAL_AXES)


def gem(x, power=GEM_DEFAULT_POWER, eps=GEM_CLAMP_EPSILON):
    """Generalised mean pooling: (mean(max(x, eps)^p))^(1/p) over H, W.

    Args:
      x: float tensor [B, H, W, C].
      power: scalar p (a float or a scalar tensor / variable when learned).
      eps: lower clip of the activations.

    Returns:
      float tensor [B, C].
    """
    power = tf.cast(power, x.dtype)
    pooled = tf.reduce_mean(tf.pow(tf.maximum(x, eps), power), axis=SPATIAL_AXES)
    return tf.pow(pooled, 1.0 / power)


POOLING_FUNCTIONS = {"spoc": spoc, "mac": mac, "gem": gem}


# SuperGlobal pooling modules (Shao et al., "Global Features are All You Need for Image
# Retrieval and Reranking", ICCV 2023), with the values of the authors' code
# (github.com/ShihaoShao-GH/SuperGlobal, modules/coarse_retrieval/{gemp,rgem,sgem,relup}.py
# and model/resnet.py, commit 6db11a7).
SUPERGLOBAL_GEM_P = 4.6  # GeM+ power (gemp.py).
SUPERGLOBAL_GEM_EPSILON = 1e-8  # gemp.py clamps at 1e-8 (our gem default: 1e-6).
REGIONAL_GEM_P = 2.5  # Lp power of regional-GeM (rgem.py "pr").
REGIONAL_GEM_WINDOW = 5  # window size, stride 1, reflection padding (window - 1) // 2.
REGIONAL_GEM_MIX = 0.5  # output = mix * Lp-pooled + (1 - mix) * input.
SCALE_GEM_P = float("inf")  # sgem.py default (infinity=True): max of L2-normalised.
SCALE_GEM_FINITE_P = 10.0  # sgem.py "ps", used when infinity=False.
RELU_PLUS_THRESHOLD = 0.014  # relup(0.014) in model/resnet.py.
SCALE_AXIS = 0
CHANNEL_AXIS = -1


def gem_plus(x, power=SUPERGLOBAL_GEM_P, eps=SUPERGLOBAL_GEM_EPSILON):
    """GeM+ of SuperGlobal: plain GeM with the larger power p = 4.6 (``gemp.py``).

    (mean over H, W of max(x, eps)^p)^(1/p); Shao et al. ICCV 2023, GeM+.

    Args:
      x: float tensor [B, H, W, C].
      power: p (4.6).
      eps: lower clip of the activations (1e-8 as in the reference code).

    Returns:
      float tensor [B, C].
    """
    return gem(x, power=power, eps=eps)


def regional_gem(x, power=REGIONAL_GEM_P, window=REGIONAL_GEM_WINDOW, mix=REGIONAL_GEM_MIX):
    """Regional-GeM of SuperGlobal: a local Lp pool mixed with its input (``rgem.py``).

        y = mix * (mean_{window} x^p)^(1/p) + (1 - mix) * x

    The window mean runs over ``window`` x ``window`` neighbourhoods, stride 1, on
    the map reflection-padded by (window - 1) // 2 (no edge repeat, as torch's
    ReflectionPad2d), so y has the shape of x. The reference writes it as
    LPPool2d(p, window)(pad(x / (window^2)^(1/p))), which is the same value.
    Applied to the last feature map before GeM+ (Shao et al. ICCV 2023,
    Regional-GeM; p = 2.5, 5 x 5 windows, mix 0.5/0.5).

    Expects non-negative activations (the map after the final ReLU); negative
    values are clipped to 0 inside the Lp pool (the reference's x^2.5 would be
    NaN) and pass unchanged through the (1 - mix) term. An inference-time module,
    like all of SuperGlobal's: the gradient of ^(1/p) is infinite at all-zero
    windows.

    Args:
      x: float tensor [B, H, W, C], H and W > (window - 1) // 2.
      power: Lp power p (2.5).
      window: odd window size (5).
      mix: weight of the pooled map (0.5).

    Returns:
      float tensor [B, H, W, C].
    """
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"regional_gem window must be an odd integer >= 1, got {window!r}.")
    pad = (int(window) - 1) // 2
    for axis, name in ((1, "height"), (2, "width")):
        size = x.shape[axis]
        if size is not None and size <= pad:
            raise ValueError(
                f"regional_gem needs a feature map {name} > {pad} for reflection padding of a "
                f"{window}x{window} window, got {name} {size} (input shape {tuple(x.shape)}); "
                f"use a larger image or a smaller window."
            )
    power = tf.cast(power, x.dtype)
    padded = tf.pad(tf.maximum(x, 0.0), [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    local_mean = tf.nn.avg_pool2d(tf.pow(padded, power), ksize=window, strides=1, padding="VALID")
    return mix * tf.pow(local_mean, 1.0 / power) + (1.0 - mix) * x


def scale_gem(descriptors, power=SCALE_GEM_P):
    """Scale-GeM of SuperGlobal: aggregates one descriptor per image scale (``sgem.py``).

    power = inf (the reference default, ``infinity=True``): each scale's
    descriptor is L2-normalised, then the element-wise max over scales is taken.
    Finite power p (reference ``ps`` = 10): a GeM over scales shifted by the
    minimum, (mean_s (x_s - g)^p)^(1/p) + g, with g the smallest value of the
    image's descriptors over all scales and channels, no normalisation. The
    reference takes g over the whole stacked tensor, i.e. over the batch too;
    it extracts one image at a time (batch size 1), so g per image here is the
    same value and keeps images independent of their batch. Shao et al. ICCV
    2023, Scale-GeM. In the reference the inputs are the per-scale outputs of
    the FC head (scales 0.7071, 1, 1.4142) and the result is L2-normalised after.

    Args:
      descriptors: float tensor [S, B, C] or a list of S tensors [B, C].
      power: inf or a finite p > 0.

    Returns:
      float tensor [B, C].
    """
    x = (
        tf.stack(descriptors, axis=SCALE_AXIS)
        if isinstance(descriptors, (list, tuple))
        else tf.convert_to_tensor(descriptors)
    )
    if x.shape.rank != 3:
        raise ValueError(
            f"scale_gem expects descriptors [num_scales, batch, channels], got shape "
            f"{tuple(x.shape)}; stack the per-scale [B, C] descriptors on axis 0."
        )
    power = float(power)
    if not power > 0:
        raise ValueError(f"scale_gem power must be > 0 or inf, got {power}.")
    if power == float("inf"):
        return tf.reduce_max(tf.math.l2_normalize(x, axis=CHANNEL_AXIS), axis=SCALE_AXIS)
    shift = tf.reduce_min(x, axis=[SCALE_AXIS, 2], keepdims=True)  # [1, B, 1]
    p = tf.cast(power, x.dtype)
    pooled = tf.pow(tf.reduce_mean(tf.pow(x - shift, p), axis=SCALE_AXIS), 1.0 / p)
    return pooled + shift[SCALE_AXIS]


def relu_plus(x, threshold=RELU_PLUS_THRESHOLD):
    """ReLU+ of SuperGlobal: max(x, threshold), a ReLU whose floor is 0.014 (``relup.py``).

    ``relup(alpha)`` is ``x.clamp(alpha)``, a lower clamp: values below the
    threshold become the threshold, values above pass (threshold 0 is ReLU).
    Where the reference applies it (model/resnet.py, with ``SupG.relup``): to the
    output x + F(x) of every residual block of the stages with fewer than 2048
    output channels (conv2_x to conv4_x), in place of the ReLU after the
    addition; the last stage (conv5_x) keeps the ReLU. Independently of that
    flag, the stage-1 bottlenecks (256 output channels) also use it after their
    first two batch norms, because ``BottleneckTransform`` receives the ``relup``
    class itself as its (truthy) flag. Shao et al. ICCV 2023, ReLU+.

    Args:
      x: float tensor of any shape.
      threshold: the floor (0.014).

    Returns:
      float tensor, shape of x.
    """
    return tf.maximum(x, tf.cast(threshold, x.dtype))
