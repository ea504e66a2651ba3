"""Attention loss L_a (eq. 6) against numpy."""

import numpy as np

from delg_tf.layers.attention_pooling import attention_pool
from delg_tf.losses.attention import attention_loss


def test_matches_eq6_on_pooled_features():
    rng = np.random.default_rng(7)
    s_prime = rng.uniform(0, 1, size=(3, 2, 2, 4)).astype(np.float32)
    a = rng.uniform(0, 1, size=(3, 2, 2, 1)).astype(np.float32)
    v = rng.normal(size=(4, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    labels = np.array([1, 4, 0])
    pooled = (a * s_prime).sum(axis=(1, 2))
    logits = pooled @ v + b
    expected = -(logits[np.arange(3), labels] - np.log(np.exp(logits).sum(axis=1)))
    got = attention_loss(attention_pool(s_prime, a) @ v + b, labels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
