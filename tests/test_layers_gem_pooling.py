"""GeMPooling against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from config_helpers import assert_config_round_trip
from delg_tf.layers.gem_pooling import GeMPooling


def numpy_gem(x, p, eps):
    return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


@pytest.mark.parametrize("power", [1.0, 3.0, 4.5])
def test_gem_matches_numpy(power):
    x = np.random.default_rng(0).uniform(0, 2, size=(2, 5, 4, 6)).astype(np.float32)
    x[0, 0, 0, 0] = 0.0  # clipped to eps
    layer = GeMPooling(power=power)
    np.testing.assert_allclose(layer(x).numpy(), numpy_gem(x, power, layer.eps), rtol=1e-5)


def test_power_fixed_by_default_and_learnable_on_request():
    fixed = GeMPooling()
    fixed.build((None, None, None, 4))
    assert fixed.trainable_weights == [] and float(fixed.power) == 3.0
    learned = GeMPooling(learn_power=True)
    x = tf.random.uniform((1, 3, 3, 4), 0.1, 1.0)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(learned(x))
    assert len(learned.trainable_weights) == 1
    assert tape.gradient(y, learned.power) is not None


def test_get_config_is_exactly_the_constructor_arguments():
    x = np.random.default_rng(9).uniform(0, 2, size=(2, 5, 4, 6))
    x[0, 0, 0, 0] = 0.0  # clipped to eps
    _, clone = assert_config_round_trip(
        GeMPooling, dict(power=2.5, learn_power=True, eps=1e-2), inputs=[x]
    )
    assert float(clone.power) == 2.5 and clone.learn_power
    np.testing.assert_allclose(clone(x).numpy(), numpy_gem(x, 2.5, 1e-2), rtol=1e-10)


def test_bad_power():
    with pytest.raises(ValueError, match="power"):
        GeMPooling(power=0.0)
