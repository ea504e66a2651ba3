"""PNG of a query and a database image side by side with inlier correspondences.

Like the DELG paper's Fig. 5/6 (Cao et al. ECCV 2020, App. C): lines connect
the keypoints of the RANSAC inliers. matplotlib is an optional extra
(``pip install 'delg_tf[plots]'``), imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

LINE_COLOR = "lime"
POINT_COLOR = "yellow"
OUTLIER_COLOR = "red"
LINE_WIDTH = 0.8
POINT_SIZE = 6
DPI = 100
KEYPOINT_ORDERS = ("yx", "xy")


def import_pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "delg_tf.visualization needs matplotlib: `pip install 'delg_tf[plots]'` "
            "(or `pip install matplotlib`)."
        ) from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_uint8_image(image) -> np.ndarray:
    """PIL image / float [0,1] / uint8 array -> uint8 [H, W, 3]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}.")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return arr


def _xy(points: np.ndarray, keypoint_order: str) -> np.ndarray:
    if keypoint_order not in KEYPOINT_ORDERS:
        raise ValueError(
            f"keypoint_order must be one of {KEYPOINT_ORDERS}, got {keypoint_order!r}."
        )
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points[:, ::-1] if keypoint_order == "yx" else points


def draw_matches(
    query_image,
    db_image,
    query_points: np.ndarray,
    db_points: np.ndarray,
    output_path,
    inlier_mask: Optional[np.ndarray] = None,
    keypoint_order: str = "yx",
    title: Optional[str] = None,
    show_outliers: bool = False,
) -> Path:
    """Writes a PNG of the two images side by side with correspondences drawn.

    Args:
        query_image: query image (PIL or array).
        db_image: database image.
        query_points: float [M, 2] query keypoints of the correspondences.
        db_points: float [M, 2] matching database keypoints.
        output_path: PNG path (parent folders are created).
        inlier_mask: bool [M]; only inliers are drawn as lines (all if None).
        keypoint_order: ``"yx"`` (DELF/DELG convention, default) or ``"xy"``.
        title: optional figure title (e.g. ``"42 inliers"``).
        show_outliers: also mark outlier keypoints in red.

    Returns:
        The PNG path.
    """
    plt = import_pyplot()
    q_img, d_img = to_uint8_image(query_image), to_uint8_image(db_image)
    q_pts, d_pts = _xy(query_points, keypoint_order), _xy(db_points, keypoint_order)
    if q_pts.shape != d_pts.shape:
        raise ValueError(
            f"query_points and db_points must have the same shape, got {q_pts.shape} "
            f"and {d_pts.shape}."
        )
    mask = (
        np.ones(len(q_pts), dtype=bool)
        if inlier_mask is None
        else np.asarray(inlier_mask, dtype=bool)
    )
    if mask.shape != (len(q_pts),):
        raise ValueError(f"inlier_mask must be [{len(q_pts)}], got shape {mask.shape}.")
    height = max(q_img.shape[0], d_img.shape[0])
    canvas = np.zeros((height, q_img.shape[1] + d_img.shape[1], 3), dtype=np.uint8)
    canvas[: q_img.shape[0], : q_img.shape[1]] = q_img
    canvas[: d_img.shape[0], q_img.shape[1] :] = d_img
    offset = np.array([q_img.shape[1], 0.0])
    fig = plt.figure(figsize=(canvas.shape[1] / DPI, canvas.shape[0] / DPI), dpi=DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(canvas)
    ax.set_axis_off()
    for q, d in zip(q_pts[mask], d_pts[mask] + offset):
        ax.plot([q[0], d[0]], [q[1], d[1]], color=LINE_COLOR, linewidth=LINE_WIDTH)
    ax.scatter(q_pts[mask, 0], q_pts[mask, 1], s=POINT_SIZE, c=POINT_COLOR)
    ax.scatter(d_pts[mask, 0] + offset[0], d_pts[mask, 1], s=POINT_SIZE, c=POINT_COLOR)
    if show_outliers and (~mask).any():
        ax.scatter(q_pts[~mask, 0], q_pts[~mask, 1], s=POINT_SIZE, c=OUTLIER_COLOR)
        ax.scatter(d_pts[~mask, 0] + offset[0], d_pts[~mask, 1], s=POINT_SIZE, c=OUTLIER_COLOR)
    if title:
        ax.text(
            5,
            5,
            title,
            color="white",
            va="top",
            fontsize=10,
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 2},
        )
    ax.set_xlim(0, canvas.shape[1])
    ax.set_ylim(canvas.shape[0], 0)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=DPI)
    plt.close(fig)
    return output_path


def draw_pair_match(
    query_image,
    db_image,
    query_features,
    db_features,
    pair_match,
    output_path,
    keypoint_order: str = "yx",
    show_outliers: bool = False,
) -> Path:
    """Draws the inliers of a :class:`delg_tf.matching.pair.PairMatch`.

    Args:
        query_image, db_image: the images (same pixel frame as the keypoints).
        query_features, db_features: ``LocalFeatures`` that were matched.
        pair_match: result of ``delg_tf.matching.pair.match_pair(query_features, db_features)``.
        output_path: PNG path.
        keypoint_order: ``"yx"`` (default, DELG) or ``"xy"``.
        show_outliers: also mark putative matches rejected by RANSAC.

    Returns:
        The PNG path.
    """
    return draw_matches(
        query_image,
        db_image,
        query_features.keypoints[pair_match.query_idx],
        db_features.keypoints[pair_match.db_idx],
        output_path,
        inlier_mask=pair_match.inlier_mask if pair_match.inlier_mask.size else None,
        keypoint_order=keypoint_order,
        title=f"{pair_match.num_inliers} inliers",
        show_outliers=show_outliers,
    )
