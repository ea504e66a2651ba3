"""Test helpers of the extraction room: a tiny DELG-like model.

`TinyDelgStandIn` has the inference API of `delg_tf.models.delg.DelgModel`
(`preprocess`, `backbone`, `local_head`, `global_head`) on the "tiny" ResNet,
with deterministic weights, so the pyramid, the export and the stores can be
tested in seconds without the real model.
"""

import keras
import numpy as np
import tensorflow as tf

from delg_tf.backbones.resnet import build_resnet
from delg_tf.ops.image import normalize_images
from delg_tf.ops.pooling import gem

LOCAL_DESCRIPTOR_DIM = 128
GLOBAL_DESCRIPTOR_DIM = 2048
ATTENTION_HIDDEN = 32
STAND_IN_SEED = 1234
# Keeps the softplus attention scores of the random network in roughly [0.3, 1.5].
ATTENTION_OUTPUT_GAIN = 0.3


class TinyDelgStandIn(keras.Model):
    """DELG inference API on the tiny ResNet (tests, CPU demos).

    Args:
      global_dim: global descriptor size.
      local_dim: local descriptor size.
      seed: weight seed.

    `local_head(S [B,h,w,C4]) -> (attention_prob [B,h,w,1], descriptors [B,h,w,local_dim])`;
    `global_head(D [B,h,w,C5]) -> [B, global_dim]` (GeM p=3 + whitening FC, raw).
    """

    def __init__(
        self,
        global_dim=GLOBAL_DESCRIPTOR_DIM,
        local_dim=LOCAL_DESCRIPTOR_DIM,
        seed=STAND_IN_SEED,
        **kwargs,
    ):
        kwargs.setdefault("name", "tiny_delg_stand_in")
        super().__init__(**kwargs)
        self.global_dim = global_dim
        self.local_dim = local_dim
        self.seed = seed
        init = lambda i: keras.initializers.HeNormal(seed=seed + i)  # noqa: E731
        self.backbone = build_resnet("tiny")
        self.attention_conv1 = keras.layers.Conv2D(
            ATTENTION_HIDDEN, 1, kernel_initializer=init(1), name="attention_conv1"
        )
        self.attention_conv2 = keras.layers.Conv2D(
            1,
            1,
            kernel_initializer=keras.initializers.RandomNormal(
                stddev=ATTENTION_OUTPUT_GAIN / np.sqrt(ATTENTION_HIDDEN), seed=seed + 2
            ),
            name="attention_conv2",
        )
        self.encoder = keras.layers.Conv2D(
            local_dim, 1, kernel_initializer=init(3), name="autoencoder_encoder"
        )
        self.whitening = keras.layers.Dense(
            global_dim, kernel_initializer=init(4), name="whitening"
        )
        channels = self.backbone.feature_channels
        self.backbone(tf.zeros([1, 64, 64, 3]))  # Creates the backbone weights.
        self.attention_conv1.build((None, None, None, channels["conv4"]))
        self.attention_conv2.build((None, None, None, ATTENTION_HIDDEN))
        self.encoder.build((None, None, None, channels["conv4"]))
        self.whitening.build((None, channels["conv5"]))

    def preprocess(self, images):
        return normalize_images(images, "delf_tf1")

    def local_head(self, s, training=False):
        hidden = tf.nn.relu(self.attention_conv1(s))
        attention_prob = tf.nn.softplus(self.attention_conv2(hidden))
        return attention_prob, self.encoder(s)

    def global_head(self, d, training=False):
        return self.whitening(gem(d))

    def call(self, images, training=False):
        features = self.backbone.call_to_conv4(self.preprocess(images), training=training)
        d = self.backbone.call_conv5(features["conv4"], training=training)
        attention, descriptors = self.local_head(features["conv4"])
        return {"attention": attention, "descriptors": descriptors, "global": self.global_head(d)}

    def get_config(self):
        return {
            "name": self.name,
            "global_dim": self.global_dim,
            "local_dim": self.local_dim,
            "seed": self.seed,
        }


def random_image(height, width, seed=0):
    """A smooth random uint8 RGB image [height, width, 3] (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127.5 + 100.0 * np.sin(xx / (7.0 + 3 * c) + yy / (11.0 + c) + c) for c in range(3)]
    image = np.stack(channels, axis=-1) + rng.normal(0.0, 10.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def randomize_batch_norm(model, seed):
    """Non-trivial frozen batch-norm statistics and affine parameters of `model`.

    Fresh BN layers (mean 0, variance 1, gamma 1, beta 0) fold to the identity, which
    would hide folding or ordering mistakes; this draws moving means and betas from
    N(0, 0.1), moving variances from U(0.5, 2) and gammas from U(0.5, 1.5).

    Args:
      model: a built Keras model (e.g. a `delg_tf.models.delg.DelgModel`).
      seed: numpy seed.
    """
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        name, shape = variable.path, variable.shape
        if "moving_mean" in name or name.endswith("beta"):
            variable.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
        elif "moving_variance" in name:
            variable.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        elif name.endswith("gamma"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))


# A small real `DelgModel` (ResNet "tiny" with one unit per stage but two in conv4).
TINY_DELG_CONFIG = dict(
    num_classes=3,
    backbone="tiny",
    embedding_dim=16,
    local_dim=8,
    attention_hidden=8,
    arcface_scale_init=4.0,
    backbone_kwargs={"units": (1, 1, 2, 1)},
)


def tiny_delg_model(seed=0, **overrides):
    """A built `DelgModel` of `TINY_DELG_CONFIG` (with `overrides`), random BN statistics.

    Args:
      seed: seed of `randomize_batch_norm` (the other weights: Keras initialisers).
      **overrides: `DelgModelConfig` fields replacing those of `TINY_DELG_CONFIG`.

    Returns:
      `delg_tf.models.delg.DelgModel`.
    """
    from delg_tf.models.delg import DelgModel, DelgModelConfig

    model = DelgModel(DelgModelConfig(**{**TINY_DELG_CONFIG, **overrides}))
    model.build()
    randomize_batch_norm(model, seed)
    return model
