"""Proxy-anchor and smoothed cross-entropy losses against numpy references."""

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.losses.proxy_anchor import proxy_anchor_loss
from delg_tf.losses.smoothed_ce import smoothed_cross_entropy

ALPHA = 32.0
MARGIN = 0.1


def _numpy_proxy_anchor(x, labels, proxies, alpha=ALPHA, margin=MARGIN):
    """Loop form of Eq. 4 of Kim et al. (CVPR 2020)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    sims = x @ p.T
    pos_terms, neg_total = [], 0.0
    for c in range(p.shape[0]):
        members = labels == c
        if members.any():
            pos_terms.append(np.log1p(np.exp(-alpha * (sims[members, c] - margin)).sum()))
        neg_total += np.log1p(np.exp(alpha * (sims[~members, c] + margin)).sum())
    return sum(pos_terms) / len(pos_terms) + neg_total / p.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_proxy_anchor_matches_numpy_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    num_classes, dim = 10, 8
    labels = rng.choice([0, 2, 3, 7], size=12)  # classes 1, 4, 5, 6, 8, 9 absent
    x = rng.normal(size=(12, dim)).astype(np.float64)
    proxies = rng.normal(size=(num_classes, dim)).astype(np.float64)
    expected = _numpy_proxy_anchor(x, labels, proxies)
    got = proxy_anchor_loss(tf.constant(x), tf.constant(labels), tf.constant(proxies))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_proxy_anchor_gradients_finite_and_absent_proxies_pushed_away():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(6, 4)), tf.float32)
    labels = tf.constant([0, 0, 1, 1, 2, 2])
    proxies = tf.Variable(rng.normal(size=(5, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = proxy_anchor_loss(x, labels, proxies)
    grad = tape.gradient(loss, proxies).numpy()
    assert np.all(np.isfinite(grad))
    # Proxies 3 and 4 have no positives but still receive negative-term gradients.
    assert np.abs(grad[3:]).sum() > 0


def _numpy_smoothed_ce(labels, logits, eps, tau):
    z = logits / tau
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    num_classes = logits.shape[1]
    target = np.full(logits.shape, eps / num_classes)
    target[np.arange(len(labels)), labels] += 1.0 - eps
    return float(np.mean(-(target * log_p).sum(axis=1)))


@pytest.mark.parametrize("eps,tau", [(0.1, 0.5), (0.0, 1.0), (0.3, 2.0)])
def test_smoothed_ce_matches_numpy(eps, tau):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)) * 3
    labels = rng.integers(0, 5, size=7)
    got = smoothed_cross_entropy(tf.constant(labels), tf.constant(logits), eps, tau)
    np.testing.assert_allclose(got.numpy(), _numpy_smoothed_ce(labels, logits, eps, tau), rtol=1e-6)


def test_smoothed_ce_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        smoothed_cross_entropy([0], [[1.0, 2.0]], 0.1, 0.0)
    with pytest.raises(ValueError, match="smoothing"):
        smoothed_cross_entropy([0], [[1.0, 2.0]], 1.0, 0.5)
