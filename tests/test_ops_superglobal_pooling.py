"""SuperGlobal pooling ops (GeM+, regional-GeM, Scale-GeM, ReLU+) against numpy transcriptions."""

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.ops import pooling


def torch_like_lppool_rgem(x_nchw, pr=2.5, size=5):
    """rgem.forward as written: 0.5 * LPPool2d(pr, size, 1)(ReflectionPad2d(pad)(x / nom)) + 0.5 x.

    LPPool2d = (avg_pool(x^p) * kw * kh)^(1/p), i.e. the window sum; explicit loops.
    """
    nominator = (size**2) ** (1.0 / pr)
    pad = (size - 1) // 2
    padded = np.pad(x_nchw / nominator, [(0, 0), (0, 0), (pad, pad), (pad, pad)], mode="reflect")
    b, c, h, w = x_nchw.shape
    pooled = np.zeros_like(x_nchw, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            window = padded[:, :, i : i + size, j : j + size]
            pooled[:, :, i, j] = (np.sum(window**pr, axis=(2, 3))) ** (1.0 / pr)
    return 0.5 * pooled + 0.5 * x_nchw


def gemp_numpy(x_nchw, p=4.6, eps=1e-8):
    """gemp.forward on the flattened map [B, C, H*W]."""
    flat = x_nchw.reshape(x_nchw.shape[0], x_nchw.shape[1], -1)
    return np.mean(np.maximum(flat, eps) ** p, axis=-1) ** (1.0 / p)


def to_nhwc(x_nchw):
    return np.transpose(x_nchw, (0, 2, 3, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def feature_map():
    x = np.random.default_rng(0).uniform(0, 2, size=(2, 3, 6, 7))  # NCHW, post-ReLU
    x[0, 0, :3, :3] = 0.0
    return x


def test_gem_plus_is_gem_with_p_4_6(feature_map):
    x = to_nhwc(feature_map)
    got = pooling.gem_plus(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, gemp_numpy(feature_map), rtol=1e-5)
    np.testing.assert_allclose(got, pooling.gem(x, 4.6, 1e-8).numpy(), rtol=1e-6)
    assert pooling.SUPERGLOBAL_GEM_P == 4.6


@pytest.mark.parametrize("power, window", [(2.5, 5), (3.0, 3), (2.5, 1)])
def test_regional_gem_matches_the_lppool_transcription(feature_map, power, window):
    got = pooling.regional_gem(tf.constant(to_nhwc(feature_map)), power=power, window=window)
    ref = torch_like_lppool_rgem(feature_map, pr=power, size=window)
    assert got.shape == (2, 6, 7, 3)
    np.testing.assert_allclose(got.numpy(), to_nhwc(ref), rtol=2e-5, atol=1e-6)


def test_regional_gem_then_gem_plus_is_the_reference_head(feature_map):
    got = pooling.gem_plus(pooling.regional_gem(tf.constant(to_nhwc(feature_map)))).numpy()
    ref = gemp_numpy(torch_like_lppool_rgem(feature_map))
    np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_regional_gem_dynamic_shape_and_errors():
    fn = tf.function(
        pooling.regional_gem, input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)]
    )
    out = fn(tf.random.uniform((1, 5, 9, 4)))
    assert out.shape == (1, 5, 9, 4)
    with pytest.raises(ValueError, match="odd integer >= 1, got 4"):
        pooling.regional_gem(tf.zeros((1, 8, 8, 2)), window=4)
    with pytest.raises(ValueError, match=r"height > 2 .* got height 2 \(input shape \(1, 2, 8"):
        pooling.regional_gem(tf.zeros((1, 2, 8, 2)))


def test_regional_gem_negative_inputs_are_finite():
    x = tf.constant([[[[-1.0]] * 5] * 5])  # [1, 5, 5, 1]
    out = pooling.regional_gem(x).numpy()
    np.testing.assert_allclose(out, -0.5)  # pooled part 0, half of the input passes


def sgem_numpy(per_scale, ps=10.0, infinity=True):
    """sgem.forward: stack, then normalise + max, or shifted GeM with gamma = x.min()."""
    x = np.stack(per_scale, 0).astype(np.float64)
    if infinity:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x.max(0)
    gamma = x.min()
    return np.mean((x - gamma) ** ps, axis=0) ** (1.0 / ps) + gamma


def test_scale_gem_max_of_normalised():
    rng = np.random.default_rng(1)
    per_scale = [rng.normal(size=(4, 6)).astype(np.float32) * s for s in (0.5, 1.0, 3.0)]
    got = pooling.scale_gem(per_scale).numpy()
    np.testing.assert_allclose(got, sgem_numpy(per_scale), rtol=1e-5, atol=1e-7)
    stacked = pooling.scale_gem(tf.constant(np.stack(per_scale))).numpy()
    np.testing.assert_array_equal(stacked, got)


def test_scale_gem_finite_power_per_image_equals_reference_at_batch_one():
    rng = np.random.default_rng(2)
    per_scale = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3)]
    got = pooling.scale_gem(per_scale, power=pooling.SCALE_GEM_FINITE_P).numpy()
    for b in range(3):  # the reference runs one image at a time
        ref = sgem_numpy([s[b : b + 1] for s in per_scale], ps=10.0, infinity=False)
        np.testing.assert_allclose(got[b : b + 1], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[num_scales, batch, channels\], got shape \(3, 5\)"):
        pooling.scale_gem(tf.zeros((3, 5)))
    with pytest.raises(ValueError, match="power must be > 0 or inf, got 0.0"):
        pooling.scale_gem(per_scale, power=0)


def test_relu_plus_is_a_lower_clamp_at_0_014():
    x = np.array([-1.0, 0.0, 0.01, 0.014, 0.02, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(pooling.relu_plus(x).numpy(), np.maximum(x, np.float32(0.014)))
    np.testing.assert_array_equal(pooling.relu_plus(x, 0.0).numpy(), np.maximum(x, 0.0))
    assert pooling.RELU_PLUS_THRESHOLD == 0.014
