"""Autoencoder: T and T' against numpy, names, config."""

import numpy as np

from config_helpers import assert_config_round_trip, seeded_initializer
from delg_tf.layers.autoencoder import Autoencoder


def test_autoencoder_matches_numpy():
    s = np.random.default_rng(3).uniform(0, 1, size=(2, 3, 3, 10)).astype(np.float32)
    ae = Autoencoder(local_dim=4, output_dim=10, name="autoencoder")
    descriptors, reconstruction = ae(s)
    assert descriptors.shape == (2, 3, 3, 4) and reconstruction.shape == (2, 3, 3, 10)
    k1, b1 = ae.conv1.kernel.numpy()[0, 0], ae.conv1.bias.numpy()
    k2, b2 = ae.conv2.kernel.numpy()[0, 0], ae.conv2.bias.numpy()
    expected_l = s @ k1 + b1
    np.testing.assert_allclose(descriptors.numpy(), expected_l, atol=1e-5)
    np.testing.assert_allclose(
        reconstruction.numpy(), np.maximum(expected_l @ k2 + b2, 0), atol=1e-5
    )
    assert sorted(w.path for w in ae.weights) == [
        "autoencoder/conv1/bias",
        "autoencoder/conv1/kernel",
        "autoencoder/conv2/bias",
        "autoencoder/conv2/kernel",
    ]


def test_get_config_is_exactly_the_constructor_arguments():
    s = np.random.default_rng(7).uniform(0, 1, size=(2, 4, 4, 12))
    args = dict(
        local_dim=5,
        output_dim=12,
        kernel_size=3,
        kernel_initializer=seeded_initializer("GlorotNormal"),
    )
    _, clone = assert_config_round_trip(Autoencoder, args, inputs=[s])
    assert clone.conv1.kernel.shape == (3, 3, 12, 5) and clone.conv2.kernel.shape == (3, 3, 5, 12)
