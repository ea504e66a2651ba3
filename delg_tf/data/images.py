"""Robust image loading for batch extraction and evaluation.

`load_image_rgb(path)` returns an 8-bit RGB array or raises `ImageLoadError`
naming the file and the reason. It never returns a silently damaged image:

* grayscale, palette, CMYK, LA/RGBA/PA, 16-bit and float images are converted
  to 8-bit RGB (16-bit values are scaled by 255/65535, not clipped);
* alpha is composited onto a background (white by default) or dropped
  (`alpha="drop"`, what the official DELF extractor's `Image.convert("RGB")`
  does);
* EXIF orientation is NOT applied by default, for parity with the official
  DELF extractor (`delf/python/utils.py`'s `RgbLoader`) and because dataset
  ground truth (e.g. Revisited Oxford query boxes) is given in stored-pixel
  coordinates; `apply_exif_orientation=True` applies it;
* missing, zero-byte, not-an-image and truncated files are refused, as are
  images smaller than `MIN_IMAGE_SIDE` pixels on a side (too small for the
  network: at stride 32 the conv5 map would be empty) and images whose header
  claims more than `MAX_IMAGE_PIXELS` pixels (checked from the header, before
  decoding: a "decompression bomb").

`decode_image_rgb(data, path)` does the same on the bytes of a file already read
(e.g. through Apache Beam's `FileSystems`, `delg_tf.extraction.beam`): same array, same
`ImageLoadError` reasons and messages as `load_image_rgb(path)`.

This module does not import TensorFlow.
"""

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delg_tf.data.errors import ImageLoadError

# Smallest accepted side in pixels. DELG's conv5 (stride 32) output needs at
# least one cell; smaller images are reported and skipped.
MIN_IMAGE_SIDE = 32
# Largest accepted pixel count (width * height) claimed by the header. 100 MP
# is far above GLDv2 / Revisited Oxford sizes and ~300 MB once decoded.
MAX_IMAGE_PIXELS = 100_000_000
# Pillow's own bomb guard: warn above MAX_IMAGE_PIXELS, error above twice it.
# Keep it at least as permissive as ours so that our explicit check (with a
# clear message) is the one that fires.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

ALPHA_MODES = ("composite", "drop")
DEFAULT_BACKGROUND = (255, 255, 255)
_UINT8_MAX = 255.0
_UINT16_MAX = 65535.0
# Messages shared by the loaders of local files and of bytes read elsewhere.
MISSING_FILE_MESSAGE = "no such file; check the path or the image list"
DIRECTORY_MESSAGE = "is a directory, expected an image file"
EMPTY_FILE_MESSAGE = "zero-byte file; re-download or remove it"
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


def _open_checked(path, max_pixels):
    """Opens `path` with Pillow, reading only the header.

    Returns:
        An un-decoded `PIL.Image.Image`.

    Raises:
        ImageLoadError: missing, empty, not an image, or too many pixels.
    """
    if not os.path.exists(path):
        raise ImageLoadError(path, "missing", MISSING_FILE_MESSAGE)
    if os.path.isdir(path):
        raise ImageLoadError(path, "unreadable", DIRECTORY_MESSAGE)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageLoadError(path, "unreadable", f"cannot stat file ({e})")
    if size == 0:
        raise ImageLoadError(path, "empty", EMPTY_FILE_MESSAGE)
    return _open_header(path, path, max_pixels)


def _open_header(source, path, max_pixels):
    """Opens `source` (a file path or a binary stream) with Pillow, reading only the
    header; errors name `path`. See `_open_checked`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(
            path,
            "too_large",
            f"header claims too many pixels ({e}); limit is "
            f"{max_pixels} (MAX_IMAGE_PIXELS); resize the image or remove it",
        )
    except UnidentifiedImageError:
        raise ImageLoadError(
            path,
            "not_an_image",
            "not a recognised image format (expected JPEG/PNG/...); remove it or fix its content",
        )
    except OSError as e:
        raise ImageLoadError(path, "unreadable", f"cannot open file ({e})")
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            path,
            "too_large",
            f"header claims {width}x{height} = {width * height} pixels, more "
            f"than the limit {max_pixels} (MAX_IMAGE_PIXELS); resize the "
            "image or raise max_pixels",
        )
    return image


def _high_bit_depth_to_uint8(image):
    """Converts an 'I;16*', 'I' or 'F' mode image to an 8-bit 'L' image.

    16-bit data (modes 'I;16*', and 'I' as Pillow opens 16-bit PNGs) is scaled
    by 255/65535. Float data in [0, 1] is scaled by 255, otherwise clipped.
    """
    array = np.asarray(image)
    if image.mode == "F":
        array = array.astype(np.float64)
        if np.nanmax(array) <= 1.0:
            array = array * _UINT8_MAX
    else:
        array = array.astype(np.float64) * (_UINT8_MAX / _UINT16_MAX)
    array = np.clip(np.nan_to_num(array), 0.0, _UINT8_MAX)
    return Image.fromarray(np.round(array).astype(np.uint8), mode="L")


def _to_rgb(image, alpha, background):
    """Converts a decoded Pillow image of any mode to 'RGB'."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_uint8(image)
    if image.mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA" and alpha == "composite":
        canvas = Image.new("RGB", image.size, tuple(background))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image_rgb(
    path,
    apply_exif_orientation=False,
    alpha="composite",
    background=DEFAULT_BACKGROUND,
    min_side=MIN_IMAGE_SIDE,
    max_pixels=MAX_IMAGE_PIXELS,
):
    """Loads an image file as 8-bit RGB, or refuses it with a clear error.

    Args:
        path: str or Path of the image file.
        apply_exif_orientation: rotate/flip per the EXIF Orientation tag. False
            (default) keeps stored-pixel orientation like the official DELF
            extractor, so boxes and keypoints stay in dataset coordinates.
        alpha: "composite" (default) pastes transparent images onto
            `background`; "drop" discards alpha like `Image.convert("RGB")`.
        background: RGB tuple used when compositing alpha.
        min_side: smallest accepted height/width in pixels (after EXIF).
        max_pixels: largest accepted width*height claimed by the header, or
            None to disable the check.

    Returns:
        np.uint8 array of shape [H, W, 3].

    Raises:
        ImageLoadError: the file is missing, empty, not an image, truncated,
            too small or too large; the message names the file.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    path = os.fspath(path)
    image = _open_checked(path, max_pixels)
    return _decode_opened(image, path, apply_exif_orientation, alpha, background, min_side)


def decode_image_rgb(
    data,
    path,
    apply_exif_orientation=False,
    alpha="composite",
    background=DEFAULT_BACKGROUND,
    min_side=MIN_IMAGE_SIDE,
    max_pixels=MAX_IMAGE_PIXELS,
):
    """`load_image_rgb` of the bytes of an image file that was read already.

    For files read through another file system layer (Apache Beam's `FileSystems`:
    gs://, s3://, ...); the checks, conversions and errors are those of `load_image_rgb`
    on a local file with these bytes (a missing file or a folder is the caller's to
    report, with `MISSING_FILE_MESSAGE` / `DIRECTORY_MESSAGE`).

    Args:
        data: the file's bytes.
        path: the file's name in error messages (str or Path; any URL).
        apply_exif_orientation, alpha, background, min_side, max_pixels: as in
            `load_image_rgb`.

    Returns:
        np.uint8 array of shape [H, W, 3].

    Raises:
        ImageLoadError: empty, not an image, truncated, too small or too large.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    path = os.fspath(path)
    if not data:
        raise ImageLoadError(path, "empty", EMPTY_FILE_MESSAGE)
    image = _open_header(io.BytesIO(data), path, max_pixels)
    return _decode_opened(image, path, apply_exif_orientation, alpha, background, min_side)


def _decode_opened(image, path, apply_exif_orientation, alpha, background, min_side):
    """Decodes a header-checked Pillow image (closing it) into uint8 RGB [H, W, 3]."""
    try:
        with image:
            try:
                image.load()
            except OSError as e:
                raise ImageLoadError(
                    path,
                    "truncated",
                    f"cannot decode image data ({e}); the file is truncated "
                    "or corrupt: re-download or remove it",
                )
            except (ValueError, SyntaxError, EOFError) as e:
                raise ImageLoadError(path, "unreadable", f"cannot decode image data ({e})")
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image, alpha, background)
            array = np.asarray(rgb, dtype=np.uint8)
    except ImageLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ImageLoadError(path, "unsupported_mode", f"cannot convert to RGB ({e})")
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise ImageLoadError(
            path,
            "too_small",
            f"image is {width}x{height}, smaller than the minimum side "
            f"{min_side} px (MIN_IMAGE_SIDE) the network needs; skipped",
        )
    return np.ascontiguousarray(array)


def try_load_image_rgb(path, **kwargs):
    """Like `load_image_rgb`, but returns the error instead of raising it.

    Returns:
        (array or None, ImageLoadError or None).
    """
    try:
        return load_image_rgb(path, **kwargs), None
    except ImageLoadError as e:
        return None, e


def list_image_files(directory, extensions=IMAGE_EXTENSIONS):
    """Lists image-like files (by extension, case-insensitive) in a folder.

    Args:
        directory: folder to scan (not recursive).
        extensions: accepted lowercase extensions.

    Returns:
        Sorted list of Path.
    """
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in extensions)
