"""Recall@K against a brute-force reference."""

import numpy as np
import pytest

from delg_tf.evaluation.recall_at_k import RECALL_KS, recall_at_k


def _brute_force(x, labels, ks):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = {}
    for k in ks:
        hits = 0
        for q in range(len(x)):
            sims = [(float(x[q] @ x[j]), j) for j in range(len(x)) if j != q]
            sims.sort(key=lambda t: -t[0])
            hits += any(labels[j] == labels[q] for _, j in sims[:k])
        out[k] = hits / len(x)
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_recall_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=60)
    x = rng.normal(size=(60, 5)) + 0.8 * np.eye(6, 5)[labels]
    got = recall_at_k(x, labels, chunk_size=chunk_size)
    expected = _brute_force(x, labels, RECALL_KS)
    assert got == pytest.approx(expected)
    assert got[1] < 1.0 and got[32] == 1.0


def test_query_itself_is_excluded():
    # Every image is its own nearest neighbour; with unique labels recall must be 0.
    x = np.eye(4)
    assert recall_at_k(x, np.arange(4), ks=(1, 2))[1] == 0.0
    # Two identical pairs: perfect recall.
    y = np.array([[1.0, 0], [1.0, 0.01], [0, 1.0], [0.01, 1.0]])
    assert recall_at_k(y, np.array([0, 0, 1, 1]), ks=(1,))[1] == 1.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(np.zeros((3, 2)), np.zeros(4))


def test_evaluate_recall_on_a_dataset():
    import tensorflow as tf

    from delg_tf.evaluation.glocal import evaluate_recall

    labels = np.array([0, 0, 1, 1, 2, 2])
    images = np.eye(3)[labels][:, None, None, :] * np.ones((6, 2, 2, 3))
    dataset = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels)).batch(4)
    recalls = evaluate_recall(lambda x: tf.reduce_mean(x, axis=(1, 2)), dataset, ks=(1, 2))
    assert recalls == {1: 1.0, 2: 1.0}
