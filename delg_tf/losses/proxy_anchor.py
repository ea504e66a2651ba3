"""Proxy-anchor loss (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric
Learning", CVPR 2020, Eq. 4), the metric loss L_M of the Glocal Retriever
(Kim, Kim, Suh, Electronics 2023, Sec. 3.5.3).

With s(x, p) the cosine similarity of embedding x and proxy p, P the set of all
proxies (one per class), P+ the proxies whose class occurs in the batch, X_p+ the
batch embeddings of p's class and X_p- all others:

    L = 1/|P+| * sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/|P|  * sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

Both sums are computed as softplus(logsumexp(.)) over masked entries, so large
`alpha` cannot overflow. Proxies of classes absent from the batch contribute to
the negative term only (and are still pushed away from every embedding).
"""

import tensorflow as tf

PROXY_ANCHOR_ALPHA = 32.0  # Scaling factor alpha of the paper and official code.
PROXY_ANCHOR_MARGIN = 0.1  # Margin delta.
# Stand-in for log(0) of masked-out entries: finite so that gradients stay finite,
# and far below any alpha * (s +- delta) for |s| <= 1.
_MASKED_LOGIT = -1e4


def _log1p_sum_exp(logits, mask):
    """log(1 + sum_i exp(logits_i)) over entries where `mask`, per column.

    Args:
      logits: float [B, P].
      mask: bool [B, P].

    Returns:
      float [P]; 0 for columns with no masked-in entry.
    """
    masked = tf.where(mask, logits, tf.cast(_MASKED_LOGIT, logits.dtype))
    return tf.nn.softplus(tf.reduce_logsumexp(masked, axis=0))


def proxy_anchor_loss(
    embeddings, labels, proxies, alpha=PROXY_ANCHOR_ALPHA, margin=PROXY_ANCHOR_MARGIN
):
    """Proxy-anchor loss of a batch.

    Args:
      embeddings: float [B, D] (need not be normalised; cosine similarity is used).
      labels: int [B], class ids in [0, num_classes).
      proxies: float [num_classes, D], one proxy per class.
      alpha: scaling factor alpha (paper: 32).
      margin: margin delta (paper: 0.1).

    Returns:
      Scalar float loss.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    proxies = tf.cast(proxies, embeddings.dtype)
    num_classes = tf.shape(proxies)[0]
    cosine = tf.matmul(
        tf.math.l2_normalize(embeddings, axis=-1),
        tf.math.l2_normalize(proxies, axis=-1),
        transpose_b=True,
    )  # [B, P]
    positive = tf.one_hot(
        tf.cast(labels, tf.int32), num_classes, on_value=True, off_value=False
    )  # [B, P]
    alpha = tf.cast(alpha, cosine.dtype)
    margin = tf.cast(margin, cosine.dtype)
    positive_terms = _log1p_sum_exp(-alpha * (cosine - margin), positive)
    negative_terms = _log1p_sum_exp(alpha * (cosine + margin), tf.logical_not(positive))
    proxies_with_positives = tf.reduce_sum(tf.cast(tf.reduce_any(positive, axis=0), cosine.dtype))
    positive_term = tf.math.divide_no_nan(tf.reduce_sum(positive_terms), proxies_with_positives)
    negative_term = tf.reduce_sum(negative_terms) / tf.cast(num_classes, cosine.dtype)
    return positive_term + negative_term
