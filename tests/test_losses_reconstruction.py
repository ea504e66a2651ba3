"""Reconstruction loss L_r (eq. 4) against numpy."""

import numpy as np

from delg_tf.losses.reconstruction import reconstruction_loss


def test_matches_eq4_per_example():
    rng = np.random.default_rng(6)
    s = rng.uniform(0, 1, size=(2, 3, 4, 5)).astype(np.float32)
    s_prime = rng.uniform(0, 1, size=(2, 3, 4, 5)).astype(np.float32)
    h, w, c = s.shape[1:]
    expected = np.array([np.sum((s_prime[i] - s[i]) ** 2) / (h * w * c) for i in range(2)])
    np.testing.assert_allclose(reconstruction_loss(s_prime, s).numpy(), expected, rtol=1e-5)
