"""Synthetic local features with known geometry, for tests and ``bench/rerank.py``.

A query image has ``num_features`` random L2-normalised descriptors at random
(y, x) keypoints. A *positive* database image contains perturbed copies of a
subset of the query descriptors at locations related to the query ones by a
known affine transform (plus pixel noise), *false putatives* (descriptors close
to query descriptors but at random locations) and random filler descriptors.
A *negative* database image has only false putatives and filler. This gives
realistic inlier ratios among putative matches (positives ~10-30%).

numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

from delg_tf.matching.features import LocalFeatures

DEFAULT_NUM_FEATURES = 1000  # paper: at most 1k local features per image.
DEFAULT_DIM = 128  # DELG local descriptor dimension.
DEFAULT_IMAGE_SIZE = (768.0, 1024.0)  # (height, width) in pixels.
KEYPOINT_NOISE_PX = 1.5
DESCRIPTOR_NOISE_RANGE = (0.3, 0.7)  # gives L2 distance ~0.3-0.6 (< 1.0 threshold).
MAX_ROTATION_RAD = np.deg2rad(25.0)
SCALE_RANGE = (0.7, 1.4)
MAX_SHEAR = 0.1
MAX_TRANSLATION_PX = 100.0


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """float32 [n, dim] random unit vectors."""
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def perturb_descriptors(rng: np.random.Generator, desc: np.ndarray) -> np.ndarray:
    """Noisy renormalised copies at L2 distance well below 1.0."""
    scale = rng.uniform(*DESCRIPTOR_NOISE_RANGE, size=(desc.shape[0], 1)).astype(np.float32)
    noisy = desc + scale * random_unit(rng, desc.shape[0], desc.shape[1])
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """float64 [2, 3] random affine (rotation, anisotropic scale, shear, translation)."""
    theta = rng.uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lin = (
        rot
        @ np.diag(rng.uniform(*SCALE_RANGE, size=2))
        @ np.array([[1.0, rng.uniform(-MAX_SHEAR, MAX_SHEAR)], [0.0, 1.0]])
    )
    return np.hstack([lin, rng.uniform(-MAX_TRANSLATION_PX, MAX_TRANSLATION_PX, size=(2, 1))])


def apply_affine(model: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``model @ [p; 1]`` for points [N, 2]."""
    return points @ model[:, :2].T + model[:, 2]


@dataclasses.dataclass
class SyntheticPair:
    """Ground truth of a generated database image relative to the query.

    Attributes:
        features: database image features.
        true_db_idx: int [T] indices of the true correspondences in ``features``.
        true_query_idx: int [T] matching query feature indices.
        db_to_query: float [2, 3] affine mapping db keypoints to query keypoints
            (None for negatives).
    """

    features: LocalFeatures
    true_db_idx: np.ndarray
    true_query_idx: np.ndarray
    db_to_query: np.ndarray


def make_query(
    rng: np.random.Generator,
    num_features: int = DEFAULT_NUM_FEATURES,
    dim: int = DEFAULT_DIM,
    image_size: Tuple[float, float] = DEFAULT_IMAGE_SIZE,
) -> LocalFeatures:
    """Random query features: keypoints (y, x) uniform in the image."""
    kp = rng.uniform((0.0, 0.0), image_size, size=(num_features, 2))
    return LocalFeatures(kp, random_unit(rng, num_features, dim))


def make_db_image(
    rng: np.random.Generator,
    query: LocalFeatures,
    num_true: int,
    num_false: int,
    num_features: int = DEFAULT_NUM_FEATURES,
    image_size: Tuple[float, float] = DEFAULT_IMAGE_SIZE,
) -> SyntheticPair:
    """A database image with ``num_true`` affine-consistent and ``num_false`` false matches.

    Args:
        rng: random generator.
        query: the query features.
        num_true: correspondences following the affine (0 for a negative).
        num_false: descriptors close to query descriptors at random locations.
        num_features: total features of the database image.
        image_size: (height, width).

    Returns:
        SyntheticPair; features are shuffled.
    """
    dim = query.descriptors.shape[1]
    num_true = min(num_true, len(query))
    num_false = min(num_false, len(query) - num_true, num_features - num_true)
    chosen = rng.permutation(len(query))[: num_true + num_false]
    true_q, false_q = chosen[:num_true], chosen[num_true:]
    query_to_db = random_affine(rng)
    lin_inv = np.linalg.inv(query_to_db[:, :2])
    db_to_query = np.hstack([lin_inv, -(lin_inv @ query_to_db[:, 2:])])
    true_kp = apply_affine(query_to_db, query.keypoints[true_q]) + rng.normal(
        0, KEYPOINT_NOISE_PX, (num_true, 2)
    )
    num_filler = max(num_features - num_true - num_false, 0)
    kp = np.concatenate(
        [true_kp, rng.uniform((0.0, 0.0), image_size, size=(num_false + num_filler, 2))]
    )
    desc = np.concatenate(
        [
            perturb_descriptors(rng, query.descriptors[true_q]),
            perturb_descriptors(rng, query.descriptors[false_q]),
            random_unit(rng, num_filler, dim),
        ]
    )
    perm = rng.permutation(kp.shape[0])
    inv_perm = np.argsort(perm)
    return SyntheticPair(
        LocalFeatures(kp[perm], desc[perm]),
        inv_perm[:num_true].astype(np.int64),
        true_q.astype(np.int64),
        db_to_query if num_true else None,
    )


def make_shortlist(
    rng: np.random.Generator,
    shortlist_size: int = 100,
    num_positives: int = 10,
    num_features: int = DEFAULT_NUM_FEATURES,
    dim: int = DEFAULT_DIM,
    inlier_ratio_range: Tuple[float, float] = (0.1, 0.3),
    positive_putatives_range: Tuple[int, int] = (200, 500),
    negative_putatives_range: Tuple[int, int] = (10, 60),
) -> Tuple[LocalFeatures, List[SyntheticPair], np.ndarray]:
    """A query and a shortlist of database images, positives at random positions.

    Args:
        rng: random generator.
        shortlist_size: number of database images.
        num_positives: how many of them share an affine-related region with the query.
        num_features: features per image.
        dim: descriptor dimension.
        inlier_ratio_range: fraction of true matches among putatives for positives.
        positive_putatives_range: number of putative matches of positives.
        negative_putatives_range: number of (false) putative matches of negatives.

    Returns:
        (query, pairs, is_positive bool [shortlist_size]).
    """
    query = make_query(rng, num_features, dim)
    is_positive = np.zeros(shortlist_size, dtype=bool)
    is_positive[rng.permutation(shortlist_size)[:num_positives]] = True
    pairs = []
    for positive in is_positive:
        if positive:
            putatives = int(rng.integers(*positive_putatives_range))
            num_true = int(round(putatives * rng.uniform(*inlier_ratio_range)))
            pairs.append(make_db_image(rng, query, num_true, putatives - num_true, num_features))
        else:
            pairs.append(
                make_db_image(
                    rng, query, 0, int(rng.integers(*negative_putatives_range)), num_features
                )
            )
    return query, pairs, is_positive
