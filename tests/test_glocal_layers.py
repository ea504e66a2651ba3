"""Glocal layers: orthogonal fusion against numpy, multi-atrous and local branch shapes."""

import numpy as np
import pytest
import tensorflow as tf

from config_helpers import assert_config_round_trip, seeded_initializer
from delg_tf.layers.global_descriptor import GlobalDescriptor, parse_descriptor_codes
from delg_tf.layers.local_branch import LocalBranch
from delg_tf.layers.multi_atrous import MultiAtrous
from delg_tf.layers.orthogonal_fusion import OrthogonalFusion, orthogonal_component


def _numpy_ofm(local, g):
    b, h, w, c = local.shape
    out = np.zeros((b, 2 * c))
    orth = np.zeros_like(local)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = local[i, y, x]
                orth[i, y, x] = v - (v @ g[i]) / (g[i] @ g[i]) * g[i]
        out[i] = np.concatenate([g[i], orth[i].mean(axis=(0, 1))])
    return out, orth


def test_orthogonal_fusion_matches_numpy_and_is_orthogonal():
    rng = np.random.default_rng(0)
    local = rng.normal(size=(2, 3, 4, 5))
    g = rng.normal(size=(2, 5))
    layer = OrthogonalFusion()
    fused = layer(tf.constant(local), tf.constant(g)).numpy()
    expected, expected_orth = _numpy_ofm(local, g)
    assert fused.shape == (2, 10)
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)
    orth = orthogonal_component(tf.constant(local), tf.constant(g)).numpy()
    np.testing.assert_allclose(orth, expected_orth, rtol=1e-6, atol=1e-9)
    # Every orthogonal local vector, and their pooled mean, is orthogonal to f_g.
    np.testing.assert_allclose(np.einsum("bhwc,bc->bhw", orth, g), 0.0, atol=1e-9)
    pooled_orth = fused[:, 5:]  # The layer computes in float32.
    np.testing.assert_allclose(np.einsum("bc,bc->b", pooled_orth, g), 0.0, atol=1e-6)


def test_orthogonal_fusion_config_is_exactly_the_constructor_arguments():
    rng = np.random.default_rng(1)
    local, g = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 5))
    _, clone = assert_config_round_trip(OrthogonalFusion, dict(pooling="mac"), inputs=[local, g])
    _, orth = _numpy_ofm(local, g)
    np.testing.assert_allclose(clone(local, g).numpy()[:, 5:], orth.max(axis=(1, 2)), rtol=1e-10)


def test_orthogonal_fusion_rejects_dimension_mismatch():
    with pytest.raises(ValueError, match="same dimension"):
        OrthogonalFusion()(tf.zeros([1, 2, 2, 4]), tf.zeros([1, 3]))


@pytest.mark.parametrize("rates", [(3, 6, 9), (6, 12, 18)])
def test_multi_atrous_shapes_and_config(rates):
    layer = MultiAtrous(16, rates=rates, name="ma")
    y = layer(tf.random.normal([2, 9, 7, 8]))
    assert y.shape == (2, 9, 7, 16)
    assert [conv.dilation_rate for conv in layer.atrous_convs] == [(r, r) for r in rates]
    assert layer.branch_filters == 4  # 16 // (3 rates + 1 pooling branch)
    with pytest.raises(ValueError, match="rates"):
        MultiAtrous(8, rates=(0, 3))


def test_multi_atrous_config_is_exactly_the_constructor_arguments():
    x = np.random.default_rng(2).normal(size=(2, 9, 7, 8))
    args = dict(
        filters=10,
        rates=[2, 4],
        branch_filters=3,
        kernel_initializer=seeded_initializer("GlorotNormal"),
    )
    _, clone = assert_config_round_trip(MultiAtrous, args, inputs=[x])
    assert [conv.dilation_rate for conv in clone.atrous_convs] == [(2, 2), (4, 4)]
    assert clone.projection.kernel.shape == (1, 1, 3 * 3, 10)


def test_local_branch_is_attention_weighted_unit_features():
    layer = LocalBranch(12, rates=(1, 2), name="local")
    features, attention = layer(tf.random.normal([2, 6, 6, 8]), training=False)
    assert features.shape == (2, 6, 6, 12) and attention.shape == (2, 6, 6, 1)
    assert np.all(attention.numpy() > 0)  # Softplus.
    norms = np.linalg.norm(features.numpy(), axis=-1)
    np.testing.assert_allclose(norms, attention.numpy()[..., 0], rtol=1e-4)


def test_local_branch_config_is_exactly_the_constructor_arguments():
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 8))
    args = dict(
        filters=6,
        rates=[1, 2],
        hidden_filters=10,
        bn_momentum=0.9,
        kernel_initializer=seeded_initializer("GlorotNormal"),
    )
    _, clone = assert_config_round_trip(
        LocalBranch, args, inputs=[x], call_kwargs={"training": False}
    )
    assert clone.multi_atrous.filters == 10 and clone.multi_atrous.rates == (1, 2)
    assert clone.feature_bn.momentum == 0.9 and clone.feature_conv.kernel.shape == (1, 1, 10, 6)


def test_global_descriptor_codes_and_output():
    assert parse_descriptor_codes("G,M") == ("G", "M")
    assert parse_descriptor_codes("smg") == ("S", "M", "G")
    with pytest.raises(ValueError, match="G,M"):
        parse_descriptor_codes("G,X")
    x = tf.random.uniform([2, 4, 4, 6])
    pooled, projected = GlobalDescriptor("M", units=3)(x)
    np.testing.assert_allclose(pooled.numpy(), x.numpy().max(axis=(1, 2)))
    assert projected.shape == (2, 3)


def test_global_descriptor_config_is_exactly_the_constructor_arguments():
    x = np.random.default_rng(4).uniform(0.1, 1.0, size=(2, 4, 4, 6))
    args = dict(code="G", units=5, gem_power=2.0, learn_gem_power=True)
    _, clone = assert_config_round_trip(GlobalDescriptor, args, inputs=[x])
    assert clone.gem.power_init == 2.0 and clone.gem.learn_power
    np.testing.assert_allclose(clone(x)[0].numpy(), np.sqrt(np.mean(x**2, axis=(1, 2))), rtol=1e-6)
