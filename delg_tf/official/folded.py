"""Batch-norm-folded inference view of a `DelgModel` (faster CPU extraction, same outputs).

`fold_delg_model(model)` returns an object with the inference API that
`delg_tf.extraction.pyramid.PyramidExtractor` (and the export) use --
``preprocess``, ``backbone.call_to_conv4``, ``backbone.call_conv5``,
``local_head``, ``global_head`` -- computed with plain TF ops on weights where
every frozen batch norm is folded into the preceding convolution:

    W' = W * gamma / sqrt(var + eps),  b' = (b - mean) * gamma / sqrt(var + eps) + beta

so each conv + BN (+ ReLU) is one ``Conv2D`` + ``BiasAdd`` (+ ``Relu``), which
TensorFlow's graph optimizer fuses into a single oneDNN kernel on CPU. Padding,
stride placement and pooling follow the model's backbone layout exactly
(`delg_tf.backbones.resnet`). Only rounding changes (~1e-6 relative); the parity
tests and the benchmark measure it. Inference only: nothing here is trainable.
"""

import numpy as np
import tensorflow as tf

from delg_tf.ops import pooling

_BATCH_SPATIAL = (1, 2)


def _fold(conv, bn):
    """(kernel, bias) of conv followed by frozen BN (bn may be None)."""
    kernel = np.asarray(conv.kernel.numpy(), np.float64)
    bias = (np.asarray(conv.bias.numpy(), np.float64) if conv.bias is not None
            else np.zeros(kernel.shape[-1]))
    if bn is not None:
        gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else 0.0
        scale = gamma / np.sqrt(np.asarray(bn.moving_variance.numpy(), np.float64) + bn.epsilon)
        kernel = kernel * scale
        bias = (bias - np.asarray(bn.moving_mean.numpy(), np.float64)) * scale + beta
    return (tf.constant(kernel.astype(np.float32)), tf.constant(bias.astype(np.float32)))


class _FoldedConv:
    """One ConvBN of the backbone (or a head conv), folded."""

    def __init__(self, conv, bn, strides, explicit_padding, activation):
        self.kernel, self.bias = _fold(conv, bn)
        self.strides = strides
        self.explicit_padding = explicit_padding  # ((before, after), (before, after)) or None
        self.activation = activation

    def __call__(self, x):
        if self.explicit_padding is not None:
            (top, bottom), (left, right) = self.explicit_padding
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
            padding = "VALID"
        else:
            padding = "SAME"
        y = tf.nn.bias_add(tf.nn.conv2d(x, self.kernel, self.strides, padding), self.bias)
        return tf.nn.relu(y) if self.activation else y


def _folded_conv_bn(layer):
    explicit = layer.pad.padding if layer.pad is not None else None
    return _FoldedConv(layer.conv, layer.bn, layer.strides, explicit, layer.activation)


class _FoldedBottleneck:
    def __init__(self, block):
        self.strides = block.strides
        self.convs = [_folded_conv_bn(c) for c in (block.conv_1, block.conv_2, block.conv_3)]
        self.shortcut = _folded_conv_bn(block.shortcut) if block.shortcut is not None else None

    def __call__(self, x):
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        elif self.strides > 1:
            shortcut = x[:, ::self.strides, ::self.strides, :]
        else:
            shortcut = x
        y = x
        for conv in self.convs:
            y = conv(y)
        return tf.nn.relu(shortcut + y)


class FoldedResNet:
    """`resnet.ResNet` inference with folded batch norm (same call API)."""

    def __init__(self, resnet):
        self.stem = _folded_conv_bn(resnet.stem)
        self.pool1_pad = resnet.pool1_pad is not None
        self.pool1_size = resnet.pool1.pool_size
        self.pool1_strides = resnet.pool1.strides
        self.pool1_padding = resnet.pool1.padding.upper()
        self.stages = [[_FoldedBottleneck(b) for b in blocks] for blocks in resnet.stages]
        self.conv4_subsample = resnet.conv4_subsample
        self.feature_channels = resnet.feature_channels

    def call_to_conv4(self, images, training=False):
        del training
        outputs = {}
        x = self.stem(images)
        outputs["conv1"] = x
        if self.pool1_pad:
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        x = tf.nn.max_pool2d(x, self.pool1_size, self.pool1_strides, self.pool1_padding)
        for name, blocks in zip(("conv2", "conv3", "conv4"), self.stages[:3]):
            for block in blocks:
                x = block(x)
            outputs[name] = x
        if self.conv4_subsample:
            outputs["conv4"] = x[:, ::2, ::2, :]
        return outputs

    def call_conv5(self, s, training=False):
        del training
        x = s
        for block in self.stages[3]:
            x = block(x)
        return x


class FoldedDelg:
    """Inference view of a built `DelgModel` with folded batch norm (see module doc).

    Args:
      model: a built `delg_tf.models.delg.DelgModel` (weights are copied: later
        changes to the model are not seen).
    """

    def __init__(self, model):
        self.config = model.config
        self._preprocess = model.preprocess
        self.backbone = FoldedResNet(model.backbone)
        self.local_channels = model.local_channels
        self.global_channels = model.global_channels
        attention = model.attention
        self.attention_conv1 = _FoldedConv(attention.conv1, attention.bn_conv1, 1, None, True)
        self.attention_conv2 = _FoldedConv(attention.conv2, None, 1, None, False)
        self.encoder = _FoldedConv(model.autoencoder.conv1, None, 1, None, False)
        self.decoder = _FoldedConv(model.autoencoder.conv2, None, 1, None, True)
        self.attention_on_reconstruction = model.config.attention_input == "reconstruction"
        self.gem_power = float(model.gem.power.numpy())
        self.gem_eps = model.gem.eps
        self.whitening_kernel = tf.constant(model.whitening.kernel.numpy())
        self.whitening_bias = tf.constant(model.whitening.bias.numpy())

    def preprocess(self, images):
        return self._preprocess(images)

    def local_head(self, s, training=False):
        del training
        descriptors = self.encoder(s)
        source = self.decoder(descriptors) if self.attention_on_reconstruction else s
        logits = self.attention_conv2(self.attention_conv1(source))
        return tf.nn.softplus(logits), descriptors

    def global_head(self, d, training=False):
        del training
        pooled = pooling.gem(d, power=self.gem_power, eps=self.gem_eps)
        return tf.nn.bias_add(tf.matmul(pooled, self.whitening_kernel), self.whitening_bias)


def fold_delg_model(model):
    """Returns a `FoldedDelg` of a built `DelgModel`."""
    return FoldedDelg(model)
