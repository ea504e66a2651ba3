"""Rendering of the embedded dataset's views (no TensorFlow).

A view is the canonical source photo warped with its homography
(`warp_view`, bilinear, edge-clamped) and then relit (`sample_photometric`,
`apply_photometric`: gamma, colour gain, contrast, brightness, Gaussian
noise). Geometry lives in `delg_tf.data.homography`; the dataset build in
`delg_tf.data.embedded`.
"""

import numpy as np

_UINT8_MAX = 255.0


def warp_view(source, homography, output_size):
    """Renders a view: out(p) = source(H^-1 p), bilinear, edge-clamped.

    Args:
        source: uint8 [H, W, 3] canonical source photo.
        homography: [3, 3] source -> view.
        output_size: (width, height) of the view.

    Returns:
        float64 [h, w, 3] in [0, 1].
    """
    from skimage.transform import ProjectiveTransform, warp

    inverse = ProjectiveTransform(matrix=np.linalg.inv(homography))
    width, height = output_size
    return warp(
        source.astype(np.float64) / _UINT8_MAX,
        inverse,
        output_shape=(height, width),
        order=1,
        mode="edge",
    )


def sample_photometric(rng, profile):
    """Samples lighting parameters of one view (dict of floats / lists)."""
    return {
        "brightness": float(rng.uniform(-profile.brightness, profile.brightness)),
        "contrast": float(rng.uniform(*profile.contrast_range)),
        "gamma": float(rng.uniform(*profile.gamma_range)),
        "color_gain": [
            float(g) for g in rng.uniform(1 - profile.color_gain, 1 + profile.color_gain, size=3)
        ],
        "noise_std": float(profile.noise_std),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def apply_photometric(image, params):
    """Applies gamma, colour gain, contrast, brightness and noise.

    out = clip(((x ** gamma) * gain - m) * contrast + m + brightness + noise)
    with m the mean of (x ** gamma) * gain and x in [0, 1].

    Args:
        image: float [H, W, 3] in [0, 1].
        params: dict from `sample_photometric`.

    Returns:
        uint8 [H, W, 3].
    """
    out = np.power(np.clip(image, 0.0, 1.0), params["gamma"])
    out = out * np.asarray(params["color_gain"])
    mean = out.mean()
    out = (out - mean) * params["contrast"] + mean + params["brightness"]
    if params["noise_std"] > 0:
        noise_rng = np.random.default_rng(params["noise_seed"])
        out = out + noise_rng.normal(0.0, params["noise_std"], out.shape)
    return np.round(np.clip(out, 0.0, 1.0) * _UINT8_MAX).astype(np.uint8)
