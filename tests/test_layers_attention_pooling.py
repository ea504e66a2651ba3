"""Attention pooling (eq. 5) against numpy."""

import numpy as np
import pytest

from config_helpers import assert_config_round_trip
from delg_tf.layers.attention_pooling import AttentionPooling, attention_pool


def test_sum_mean_and_normalized_match_numpy():
    rng = np.random.default_rng(4)
    s = rng.uniform(0, 1, size=(2, 3, 4, 5)).astype(np.float32)
    a = rng.uniform(0, 2, size=(2, 3, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(
        AttentionPooling()(s, a).numpy(), (a * s).sum(axis=(1, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(
        attention_pool(s, a, reduction="mean").numpy(), (a * s).mean(axis=(1, 2)), rtol=1e-5
    )
    unit = s / np.linalg.norm(s, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        attention_pool(s, a, "mean", normalize=True).numpy(),
        (a * unit).mean(axis=(1, 2)),
        rtol=1e-5,
    )


def test_get_config_is_exactly_the_constructor_arguments():
    rng = np.random.default_rng(6)
    s = rng.uniform(0, 1, size=(2, 3, 4, 5))
    a = rng.uniform(0, 2, size=(2, 3, 4, 1))
    _, clone = assert_config_round_trip(
        AttentionPooling, dict(reduction="mean", normalize=True), inputs=[s, a]
    )
    unit = s / np.linalg.norm(s, axis=-1, keepdims=True)
    np.testing.assert_allclose(clone(s, a).numpy(), (a * unit).mean(axis=(1, 2)), rtol=1e-12)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        AttentionPooling(reduction="max")
