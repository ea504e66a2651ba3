"""CosineClassifier (ArcFace head) against numpy."""

import math

import numpy as np
import pytest

from config_helpers import assert_config_round_trip, seeded_initializer
from delg_tf.layers.cosine_classifier import CosineClassifier


def test_cosine_scale_and_margin_match_numpy():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 8)).astype(np.float32)
    layer = CosineClassifier(num_classes=5, margin=0.1)
    cosine = layer(g).numpy()
    w = layer.kernel.numpy()
    expected = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True)
    )
    np.testing.assert_allclose(cosine, expected, atol=1e-6)
    assert float(layer.scale) == pytest.approx(math.sqrt(8))
    labels = np.array([0, 4, 2])
    logits = layer.logits(g, labels).numpy()
    adjusted = expected.copy()
    rows = np.arange(3)
    adjusted[rows, labels] = np.cos(np.arccos(expected[rows, labels]) + 0.1)
    np.testing.assert_allclose(logits, math.sqrt(8) * adjusted, atol=1e-5)
    np.testing.assert_allclose(layer.logits(g).numpy(), math.sqrt(8) * expected, atol=1e-5)


def test_scale_init_2048_and_trainability():
    layer = CosineClassifier(num_classes=3)
    layer.build((None, 2048))
    assert float(layer.scale) == pytest.approx(45.25, abs=0.01)
    assert len(layer.trainable_weights) == 2
    fixed = CosineClassifier(num_classes=3, scale_init=30.0, learn_scale=False)
    fixed.build((None, 4))
    assert float(fixed.scale) == 30.0 and len(fixed.trainable_weights) == 1


def test_get_config_is_exactly_the_constructor_arguments():
    g = np.random.default_rng(8).normal(size=(3, 6))
    args = dict(
        num_classes=7,
        scale_init=10.0,
        learn_scale=False,
        margin=0.2,
        kernel_initializer=seeded_initializer("GlorotNormal"),
    )
    _, clone = assert_config_round_trip(CosineClassifier, args, inputs=[g])
    assert float(clone.scale) == 10.0 and not clone.learn_scale
    # The rebuilt layer uses the given scale (10) and margin (0.2).
    labels = np.array([0, 6, 2])
    cosine = clone(g).numpy()
    rows = np.arange(len(labels))
    cosine[rows, labels] = np.cos(np.arccos(cosine[rows, labels]) + 0.2)
    np.testing.assert_allclose(clone.logits(g, labels).numpy(), 10.0 * cosine, rtol=1e-12)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        CosineClassifier(num_classes=0)
