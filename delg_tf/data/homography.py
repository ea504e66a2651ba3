"""Homography maths of the embedded dataset (pure numpy, no TensorFlow).

Coordinates: x = column, y = row, pixel centres at integer coordinates (the
scikit-image convention; the top-left pixel covers [-0.5, 0.5]^2). For the
COLMAP / OpenCV-with-0.5 convention use `shift_homography_convention(H, 0.5)`.
A homography H maps homogeneous source points [x, y, 1] to view points.

Holds the exact 4-point homography, point mapping and conventions, the random
crop-quad sampling of a view (`sample_view_geometry`, DELG, Cao et al. ECCV
2020, sec. 4: local features are verified with RANSAC homographies) and the
ground-truth look-ups in transforms.json (`homography_to_view`,
`homography_between`). Used by `delg_tf.data.embedded`.
"""

import numpy as np

# Bounds fitting: a quad is shrunk until it fits the photo with this margin.
_FIT_MARGIN = 0.5


def homography_from_points(src, dst):
    """Exact homography mapping 4 source points onto 4 destination points.

    Args:
        src: [4, 2] float (x, y) points, no three collinear.
        dst: [4, 2] float (x, y) points.

    Returns:
        [3, 3] float64 H with H[2, 2] = 1 and dst ~ H @ [src, 1].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(h, points):
    """Maps [N, 2] (x, y) points with the [3, 3] homography `h`.

    Returns:
        [N, 2] float64 mapped points.
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    mapped = homogeneous @ np.asarray(h, np.float64).T
    return mapped[:, :2] / mapped[:, 2:3]


def normalize_homography(h):
    """Scales `h` so that h[2, 2] == 1."""
    h = np.asarray(h, np.float64)
    return h / h[2, 2]


def shift_homography_convention(h, offset=0.5):
    """Re-expresses `h` for coordinates shifted by `offset` in both images.

    With offset=0.5, turns a homography in the integer-pixel-centre
    convention used here into COLMAP's (pixel centres at +0.5).

    Returns:
        [3, 3] float64 T(offset) @ h @ T(-offset).
    """
    shift = np.array([[1, 0, offset], [0, 1, offset], [0, 0, 1]], np.float64)
    unshift = np.array([[1, 0, -offset], [0, 1, -offset], [0, 0, 1]], np.float64)
    return normalize_homography(shift @ np.asarray(h, np.float64) @ unshift)


def _fit_quad(quad, width, height):
    """Shrinks (about its centre) and shifts a quad into the photo bounds."""
    low = np.array([_FIT_MARGIN, _FIT_MARGIN])
    high = np.array([width - 1 - _FIT_MARGIN, height - 1 - _FIT_MARGIN])
    center = quad.mean(axis=0)
    extent = quad.max(axis=0) - quad.min(axis=0)
    scale = min(1.0, float(np.min((high - low) / np.maximum(extent, 1e-9))))
    quad = center + (quad - center) * scale
    shift = np.maximum(low - quad.min(axis=0), 0.0) - np.maximum(quad.max(axis=0) - high, 0.0)
    return quad + shift


def sample_view_geometry(rng, profile, source_shape, image_size):
    """Samples the crop quad and output size of one view.

    Args:
        rng: np.random.Generator.
        profile: a `delg_tf.data.embedded.ViewProfile` (its geometry ranges).
        source_shape: (height, width) of the canonical source photo.
        image_size: nominal long side of the views.

    Returns:
        dict with `quad` ([4, 2] source points TL, TR, BR, BL that map to the
        view's corners), `output_size` (width, height), `rotation_deg`,
        `area_fraction` and `homography` ([3, 3] source -> view).
    """
    height, width = source_shape
    area = rng.uniform(*profile.area_range) * width * height
    aspect = (width / height) * np.exp(
        rng.uniform(-profile.aspect_log_range, profile.aspect_log_range)
    )
    crop_w = min(np.sqrt(area * aspect), width - 1.0)
    crop_h = min(np.sqrt(area / aspect), height - 1.0)
    center = np.array(
        [
            rng.uniform(crop_w / 2, width - 1 - crop_w / 2),
            rng.uniform(crop_h / 2, height - 1 - crop_h / 2),
        ]
    )
    corners = (
        np.array([[-crop_w, -crop_h], [crop_w, -crop_h], [crop_w, crop_h], [-crop_w, crop_h]]) / 2.0
    )
    rotation = rng.uniform(-profile.max_rotation_deg, profile.max_rotation_deg)
    theta = np.deg2rad(rotation)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    jitter = rng.uniform(-profile.perspective, profile.perspective, size=(4, 2)) * np.array(
        [crop_w, crop_h]
    )
    quad = _fit_quad(center + (corners + jitter) @ rot.T, width, height)
    mean_w = (np.linalg.norm(quad[1] - quad[0]) + np.linalg.norm(quad[2] - quad[3])) / 2
    mean_h = (np.linalg.norm(quad[3] - quad[0]) + np.linalg.norm(quad[2] - quad[1])) / 2
    long_side = image_size * rng.uniform(*profile.output_scale_range)
    out_scale = long_side / max(mean_w, mean_h)
    out_w = max(2, int(round(mean_w * out_scale)))
    out_h = max(2, int(round(mean_h * out_scale)))
    target = np.array([[0, 0], [out_w - 1, 0], [out_w - 1, out_h - 1], [0, out_h - 1]], np.float64)
    return {
        "quad": quad,
        "output_size": (out_w, out_h),
        "rotation_deg": float(rotation),
        "area_fraction": float(_polygon_area(quad) / (width * height)),
        "homography": homography_from_points(quad, target),
    }


def _polygon_area(points):
    """Shoelace area of a polygon given as [N, 2] points."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def homography_to_view(meta, name):
    """[3, 3] homography from the canonical source photo to image `name`."""
    images = meta["images"]
    if name not in images:
        raise KeyError(f"image {name!r} not in transforms.json (names have no extension)")
    return np.asarray(images[name]["homography_source_to_view"], np.float64)


def homography_between(meta, name_a, name_b):
    """Ground-truth homography mapping points of view `name_a` into `name_b`.

    Args:
        meta: transforms.json content (`load_transforms`).
        name_a: image name (no extension), train/query/database.
        name_b: image name of the same source photo.

    Returns:
        [3, 3] float64 H_b @ inv(H_a), normalised so that H[2, 2] = 1.

    Raises:
        ValueError: the two images come from different photos.
    """
    photo_a = meta["images"][name_a]["photo"] if name_a in meta["images"] else None
    photo_b = meta["images"][name_b]["photo"] if name_b in meta["images"] else None
    h_a = homography_to_view(meta, name_a)
    h_b = homography_to_view(meta, name_b)
    if photo_a != photo_b:
        raise ValueError(
            f"{name_a} ({photo_a}) and {name_b} ({photo_b}) show "
            "different photos: no homography between them"
        )
    return normalize_homography(h_b @ np.linalg.inv(h_a))
