"""Recall@K of the deep-metric-learning protocol (CUB-200-2011, Cars196, SOP).

Every test image is a query against all the *other* test images (the query itself
is excluded); Recall@K is the fraction of queries with at least one image of the
same class among their K nearest neighbours by cosine similarity. This is the
protocol of the Glocal Retriever paper (Kim, Kim, Suh, Electronics 2023, Tables
1-5) and of Proxy Anchor / CGD.

numpy only; the similarity matrix is computed in chunks of queries, so memory is
O(chunk_size * N).
"""

import numpy as np

RECALL_KS = (1, 2, 4, 8, 16, 32)
DEFAULT_CHUNK_SIZE = 1024
_NORM_EPSILON = 1e-12


def l2_normalize(x, axis=-1):
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _NORM_EPSILON)


def recall_at_k(embeddings, labels, ks=RECALL_KS, chunk_size=DEFAULT_CHUNK_SIZE):
    """Recall@K with cosine similarity, each query excluded from its own ranking.

    Args:
      embeddings: float array [N, D] (normalised here; need not be unit length).
      labels: int array [N] of class ids.
      ks: increasing positive K values. K larger than N - 1 is clipped to N - 1.
      chunk_size: number of queries whose similarities are held in memory at once.

    Returns:
      dict {K: recall in [0, 1]} for each K in `ks`.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], received shape {embeddings.shape}.")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"labels must be [N] = [{embeddings.shape[0]}], received shape "
            f"{labels.shape}; pass one class id per embedding."
        )
    num = embeddings.shape[0]
    if num < 2:
        raise ValueError(f"Recall@K needs at least 2 embeddings, received {num}.")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, received {ks!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, received {chunk_size!r}.")
    max_k = min(max(ks), num - 1)
    x = l2_normalize(embeddings)
    hits = {k: 0 for k in ks}
    for start in range(0, num, chunk_size):
        stop = min(start + chunk_size, num)
        sims = x[start:stop] @ x.T  # [chunk, N]
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-sims, max_k - 1, axis=1)[:, :max_k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        neighbours = np.take_along_axis(top, order, axis=1)  # [chunk, max_k], best first
        same = labels[neighbours] == labels[start:stop, None]
        first_hit = np.where(same.any(axis=1), same.argmax(axis=1), max_k)  # 0-based rank
        for k in ks:
            hits[k] += int(np.sum(first_hit < min(k, max_k)))
    return {k: hits[k] / num for k in ks}


def format_recalls(recalls):
    """'R@1 71.83  R@2 81.14 ...' (percent) for logs."""
    return "  ".join(f"R@{k} {100.0 * r:.2f}" for k, r in sorted(recalls.items()))
