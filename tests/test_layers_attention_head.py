"""AttentionHead: math against numpy, variants and names."""

import numpy as np
import tensorflow as tf

from config_helpers import assert_config_round_trip, seeded_initializer
from delg_tf.layers.attention_head import AttentionHead


def softplus(x):
    return np.log1p(np.exp(x))


def test_attention_matches_numpy_without_bn():
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 6)).astype(np.float32)
    head = AttentionHead(hidden_channels=5, use_bn=False)
    prob, logits = head(x)
    assert prob.shape == (2, 3, 4, 1) and logits.shape == (2, 3, 4, 1)
    k1, b1 = head.conv1.kernel.numpy()[0, 0], head.conv1.bias.numpy()
    k2, b2 = head.conv2.kernel.numpy()[0, 0], head.conv2.bias.numpy()
    hidden = np.maximum(x @ k1 + b1, 0)
    expected_logits = hidden @ k2 + b2
    np.testing.assert_allclose(logits.numpy(), expected_logits, atol=1e-5)
    np.testing.assert_allclose(prob.numpy(), softplus(expected_logits), atol=1e-5)


def test_official_tf2_and_slim_variants_and_names():
    tf2 = AttentionHead(hidden_channels=4, use_bn=True, conv1_bias=True, name="attention")
    tf2.build((None, None, None, 6))
    names = sorted(w.path for w in tf2.weights)
    assert "attention/conv1/bias" in names and "attention/bn_conv1/gamma" in names
    assert "attention/conv2/kernel" in names
    slim = AttentionHead(hidden_channels=4, use_bn=True, conv1_bias=False, name="attention")
    slim.build((None, None, None, 6))
    assert not any(w.path == "attention/conv1/bias" for w in slim.weights)
    assert float(tf.reduce_min(slim(tf.zeros((1, 2, 2, 6)))[0])) > 0  # softplus > 0


def test_get_config_is_exactly_the_constructor_arguments():
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 6))
    args = dict(
        hidden_channels=7,
        kernel_size=3,
        use_bn=False,
        conv1_bias=False,
        bn_epsilon=1e-5,
        bn_momentum=0.9,
        kernel_initializer=seeded_initializer(),
    )
    _, clone = assert_config_round_trip(AttentionHead, args, inputs=[x])
    assert clone.conv1.kernel.shape == (3, 3, 6, 7) and clone.conv1.bias is None
    assert clone.bn_conv1 is None
    # With BN (the default use_bn=True): the rebuilt batch norm has the given numbers.
    bn_args = dict(args, use_bn=True)
    layer = AttentionHead(**bn_args)
    config = layer.get_config()
    assert {k: config[k] for k in bn_args} == bn_args
    clone = AttentionHead.from_config(config)
    assert (clone.bn_conv1.epsilon, clone.bn_conv1.momentum) == (1e-5, 0.9)
