"""ArcFace-adjusted logits and loss (eqs. 2-3) against numpy."""

import math

import numpy as np
import tensorflow as tf

from delg_tf.losses.arcface import arcface_cosine, arcface_logits, arcface_loss


def numpy_arcface_loss(u, labels, scale, m):
    adjusted = u.copy()
    for i, k in enumerate(labels):
        theta = np.arccos(u[i, k])
        if theta <= math.pi - m:
            adjusted[i, k] = np.cos(theta + m)
    logits = scale * adjusted
    logits = logits - logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels], scale * adjusted


def test_loss_and_logits_match_numpy():
    u = np.random.default_rng(5).uniform(-0.9, 0.9, size=(4, 6)).astype(np.float32)
    labels = np.array([0, 5, 2, 2])
    expected_loss, expected_logits = numpy_arcface_loss(u, labels, 45.25, 0.1)
    np.testing.assert_allclose(
        arcface_logits(u, labels, 45.25, 0.1).numpy(), expected_logits, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        arcface_loss(u, labels, 45.25, 0.1).numpy(), expected_loss, rtol=1e-4, atol=1e-4
    )


def test_margin_only_on_true_class_and_not_beyond_pi_minus_m():
    u = np.array([[0.5, 0.5], [-0.999, 0.2]], np.float32)
    out = arcface_cosine(u, np.array([0, 0]), 0.1).numpy()
    assert abs(out[0, 0] - np.cos(np.arccos(0.5) + 0.1)) < 1e-6
    assert out[0, 1] == 0.5 and out[1, 1] == np.float32(0.2)
    assert out[1, 0] == np.float32(-0.999)  # theta > pi - m: unchanged
    np.testing.assert_array_equal(arcface_cosine(u, np.array([0, 1]), 0.0), u)


def test_gradient_finite_at_cosine_one():
    u = tf.constant([[1.0, 0.0], [-1.0, 1.0]])
    with tf.GradientTape() as tape:
        tape.watch(u)
        loss = tf.reduce_sum(arcface_loss(u, tf.constant([0, 1]), 10.0, 0.1))
    assert np.all(np.isfinite(tape.gradient(loss, u).numpy()))
