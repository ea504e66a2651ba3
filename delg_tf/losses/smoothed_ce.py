"""Cross-entropy with label smoothing and temperature scaling: the auxiliary
classification loss L_A of CGD (Jun et al., "Combination of Multiple Global
Descriptors for Image Retrieval", arXiv:1903.10663, Sec. 3.2) reused by the Glocal
Retriever (Kim, Kim, Suh, Electronics 2023, Sec. 3.5).

    log p = log_softmax(logits / tau)
    L = mean_batch[ (1 - eps) * (-log p_y) + eps * mean_c(-log p_c) ]

i.e. the cross-entropy against the target distribution (1 - eps) * onehot(y) +
eps / C (Szegedy et al., CVPR 2016). The defaults eps = 0.1, tau = 0.5 are those of the
public CGD implementation leftthomas/CGD (`--smoothing 0.1 --temperature 0.5`, its
`LabelSmoothingCrossEntropyLoss`); the CGD paper's own text could not be checked here,
so both are flags of the Glocal model (`label_smoothing`, `temperature`).
"""

import tensorflow as tf

CGD_LABEL_SMOOTHING = 0.1
CGD_TEMPERATURE = 0.5


def smoothed_cross_entropy(
    labels, logits, smoothing=CGD_LABEL_SMOOTHING, temperature=CGD_TEMPERATURE
):
    """Label-smoothed, temperature-scaled softmax cross-entropy, batch mean.

    Args:
      labels: int [B], class ids in [0, C).
      logits: float [B, C].
      smoothing: label-smoothing epsilon in [0, 1).
      temperature: softmax temperature tau > 0 (logits are divided by it).

    Returns:
      Scalar float loss.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), received {smoothing!r}.")
    if temperature <= 0.0:
        raise ValueError(f"softmax temperature must be > 0, received {temperature!r}.")
    logits = tf.convert_to_tensor(logits)
    log_probs = tf.nn.log_softmax(logits / tf.cast(temperature, logits.dtype), axis=-1)
    labels = tf.cast(labels, tf.int32)
    nll = -tf.gather(log_probs, labels, axis=1, batch_dims=1)
    uniform = -tf.reduce_mean(log_probs, axis=-1)
    return tf.reduce_mean((1.0 - smoothing) * nll + smoothing * uniform)
