"""Local features of one image, the input of matching and re-ranking.

Keypoint convention: ``LocalFeatures.keypoints`` are pixel coordinates in the
original (uncropped/unscaled) image as **(y, x)** = (row, col), the DELF/DELG
convention (the feature store's ``locations``). Geometric verification gives the
same inlier count for (x, y) as long as query and database use the same order;
only visualisation cares.

numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KEYPOINT_DIM = 2


@dataclasses.dataclass
class LocalFeatures:
    """Local features of one image.

    Attributes:
        keypoints: float [N, 2] pixel coordinates (y, x) in the original image.
        descriptors: float [N, D] (L2-normalised) or uint8 [N, D/8] packed bits.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self):
        kp = np.asarray(self.keypoints, dtype=np.float64)
        desc = np.asarray(self.descriptors)
        if kp.size == 0:
            kp = kp.reshape(0, KEYPOINT_DIM)
        if desc.size == 0 and desc.ndim != 2:
            desc = desc.reshape(0, 0)
        if kp.ndim != 2 or kp.shape[1] != KEYPOINT_DIM:
            raise ValueError(f"keypoints must be [N, 2] (y, x), got shape {kp.shape}.")
        if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
            raise ValueError(
                f"descriptors must be [N, D] with N = {kp.shape[0]} keypoints, "
                f"got shape {desc.shape}."
            )
        self.keypoints, self.descriptors = kp, desc

    def __len__(self):
        return self.keypoints.shape[0]
