"""Affine RANSAC through pycolmap: the only module of delg_tf that imports pycolmap.

DELG geometric verification (Cao et al. ECCV 2020, Sec. 4.1 and App. B): RANSAC
with an affine model, 1000 iterations, residual threshold 20 px, minimum
number of inliers 0 for retrieval datasets.

``pycolmap.estimate_affine2d_robust`` runs COLMAP's LO-RANSAC; its ``max_error``
is a Euclidean reprojection distance in pixels (like skimage's
``residual_threshold``). We fix the number of trials by setting
``min_num_trials = max_num_trials = iterations`` and pass a fixed
``random_seed``, so results are deterministic. The call releases the GIL, so
threads run it in parallel (measured: see ``bench/rerank.py``).

The pycolmap version is checked at import; versions outside the tested range
raise :class:`PycolmapVersionError` with the fix.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

import numpy as np

from delg_tf.matching.defaults import (
    DEFAULT_RANSAC_ITERATIONS,
    DEFAULT_RANSAC_RESIDUAL_THRESHOLD,
    DEFAULT_RANSAC_SEED,
)

PYCOLMAP_MIN_VERSION = (4, 2)  # inclusive
PYCOLMAP_MAX_VERSION = (4, 3)  # exclusive
AFFINE_MIN_SAMPLES = 3
# Like the official DELF code, a pair needs strictly more putative matches than
# the minimal sample (3 points always fit an affine exactly) to be verified.
DEFAULT_MIN_PUTATIVE_MATCHES = AFFINE_MIN_SAMPLES + 1
POINT_DIM = 2


class PycolmapVersionError(ImportError):
    """The installed pycolmap is outside the tested version range."""


def _parse_version(version: str) -> Tuple[int, ...]:
    """``"4.2.1"`` -> ``(4, 2)``; ``()`` when unparsable."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def check_pycolmap_version(version: str) -> None:
    """Raises if ``version`` is outside [PYCOLMAP_MIN_VERSION, PYCOLMAP_MAX_VERSION).

    Args:
        version: a version string such as ``"4.2.1"``.

    Raises:
        PycolmapVersionError: with the expected range and the pip command.
    """
    parsed = _parse_version(str(version))
    lo = ".".join(map(str, PYCOLMAP_MIN_VERSION))
    hi = ".".join(map(str, PYCOLMAP_MAX_VERSION))
    if not parsed or not PYCOLMAP_MIN_VERSION <= parsed < PYCOLMAP_MAX_VERSION:
        raise PycolmapVersionError(
            f"delg_tf.matching.colmap_ransac is tested with pycolmap>={lo},<{hi} but found "
            f"pycolmap {version}. Its RANSAC API (estimate_affine2d_robust, RANSACOptions "
            f"fields) changes between releases; install a tested version with "
            f"`pip install 'pycolmap>={lo},<{hi}'`."
        )


try:
    import pycolmap as _pycolmap
except ImportError as _e:  # pragma: no cover - pycolmap is a hard dependency.
    raise ImportError(
        "delg_tf.matching.colmap_ransac needs pycolmap (`pip install 'pycolmap>=4.2,<4.3'`)."
    ) from _e
check_pycolmap_version(getattr(_pycolmap, "__version__", "unknown"))


@dataclasses.dataclass
class RansacResult:
    """Output of :func:`estimate_affine_ransac`.

    Attributes:
        num_inliers: number of inlier correspondences (0 when unverifiable).
        inlier_mask: bool [M].
        model: float64 [2, 3] affine ``tgt = A @ [src; 1]``, or None.
    """

    num_inliers: int
    inlier_mask: np.ndarray
    model: Optional[np.ndarray]


def make_ransac_options(
    residual_threshold: float = DEFAULT_RANSAC_RESIDUAL_THRESHOLD,
    iterations: int = DEFAULT_RANSAC_ITERATIONS,
    seed: Optional[int] = DEFAULT_RANSAC_SEED,
):
    """pycolmap.RANSACOptions running exactly ``iterations`` trials.

    Args:
        residual_threshold: inlier distance in pixels.
        iterations: number of RANSAC trials (min and max).
        seed: random seed (None = nondeterministic).

    Returns:
        pycolmap.RANSACOptions.
    """
    if residual_threshold <= 0 or iterations < 1:
        raise ValueError(
            f"need residual_threshold > 0 and iterations >= 1, got "
            f"{residual_threshold} and {iterations}."
        )
    options = _pycolmap.RANSACOptions(max_error=float(residual_threshold))
    options.min_num_trials = int(iterations)
    options.max_num_trials = int(iterations)
    options.random_seed = -1 if seed is None else int(seed)
    options.num_threads = 1  # parallelism is across image pairs (retrieval/rerank.py).
    return options


def estimate_affine_ransac(
    src: np.ndarray,
    tgt: np.ndarray,
    residual_threshold: float = DEFAULT_RANSAC_RESIDUAL_THRESHOLD,
    iterations: int = DEFAULT_RANSAC_ITERATIONS,
    seed: Optional[int] = DEFAULT_RANSAC_SEED,
    min_putative_matches: int = DEFAULT_MIN_PUTATIVE_MATCHES,
    options=None,
) -> RansacResult:
    """Robust affine fit ``tgt ~ A [src; 1]`` with pycolmap LO-RANSAC.

    Args:
        src: float [M, 2] points (e.g. database keypoints of putative matches).
        tgt: float [M, 2] corresponding points (query keypoints). The same
            coordinate order ((y, x) or (x, y)) must be used for both; the inlier
            count does not depend on which.
        residual_threshold: inlier distance in pixels (paper: 20).
        iterations: RANSAC trials (paper: 1000).
        seed: random seed for reproducibility.
        min_putative_matches: fewer correspondences than this -> 0 inliers
            (default 4, as the official code: 3 points always fit exactly).
        options: prebuilt RANSACOptions (overrides the three previous args).

    Returns:
        RansacResult; ``num_inliers == 0`` and ``model is None`` when there are
        too few correspondences or pycolmap finds no model.

    Raises:
        ValueError: src/tgt with wrong shapes or different lengths.
    """
    src = (
        np.asarray(src, dtype=np.float64).reshape(-1, POINT_DIM)
        if np.size(src)
        else np.zeros((0, 2))
    )
    tgt = (
        np.asarray(tgt, dtype=np.float64).reshape(-1, POINT_DIM)
        if np.size(tgt)
        else np.zeros((0, 2))
    )
    if src.shape != tgt.shape:
        raise ValueError(
            f"src and tgt must both be [M, 2] with the same M, got {src.shape} and {tgt.shape}."
        )
    num = src.shape[0]
    if num < max(min_putative_matches, AFFINE_MIN_SAMPLES):
        return RansacResult(0, np.zeros(num, dtype=bool), None)
    if options is None:
        options = make_ransac_options(residual_threshold, iterations, seed)
    out = _pycolmap.estimate_affine2d_robust(
        np.ascontiguousarray(src), np.ascontiguousarray(tgt), options
    )
    if out is None:
        return RansacResult(0, np.zeros(num, dtype=bool), None)
    mask = np.asarray(out["inlier_mask"], dtype=bool)
    return RansacResult(int(out["num_inliers"]), mask, np.asarray(out["tgt_from_src"]))


def pycolmap_version() -> str:
    """The installed pycolmap version string."""
    return str(_pycolmap.__version__)
