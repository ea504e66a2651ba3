"""Attention pooling (eq. 5) against numpy."""

import numpy as np
import pytest

from delg_tf.layers.attention_pooling import AttentionPooling, attention_pool


def test_sum_mean_and_normalized_match_numpy():
    rng = np.random.default_rng(4)
    s = rng.uniform(0, 1, size=(2, 3, 4, 5)).astype(np.float32)
    a = rng.uniform(0, 2, size=(2, 3, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(AttentionPooling()(s, a).numpy(), (a * s).sum(axis=(1, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(attention_pool(s, a, reduction="mean").numpy(),
                               (a * s).mean(axis=(1, 2)), rtol=1e-5)
    unit = s / np.linalg.norm(s, axis=-1, keepdims=True)
    np.testing.assert_allclose(attention_pool(s, a, "mean", normalize=True).numpy(),
                               (a * unit).mean(axis=(1, 2)), rtol=1e-5)


def test_config_and_errors():
    layer = AttentionPooling(reduction="mean", normalize=True)
    assert AttentionPooling.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="reduction"):
        AttentionPooling(reduction="max")
