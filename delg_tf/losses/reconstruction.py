"""Autoencoder reconstruction loss L_r (DELG eq. 4)."""

import tensorflow as tf

NON_BATCH_AXES = (1, 2, 3)


def reconstruction_loss(reconstruction, features):
    """Per-example L_r = 1/(H_S W_S C_S) sum_{h,w} ||s'_{h,w} - s_{h,w}||^2.

    This is the mean squared error over H, W and C, as the official TF2 code
    computes it (`reduce_mean(keras.losses.MSE(S, S'))`: the MSE averages the
    channels, the mean averages the positions and the batch).

    Args:
      reconstruction: float tensor S' [B, H, W, C].
      features: float tensor S [B, H, W, C] (the target; stop its gradient in
        the caller if the backbone must not be trained by L_r).

    Returns:
      float tensor [B].
    """
    return tf.reduce_mean(tf.math.squared_difference(reconstruction, features), axis=NON_BATCH_AXES)
