"""Test helpers of the data room: a corpus of good and bad image files.

`write_bad_image_corpus(directory)` writes small files that exercise every
branch of `delg_tf.data.images.load_image_rgb`: unusual but valid images that
must load (CMYK, 16-bit, alpha, palette, EXIF-rotated, unicode names) and bad
ones that must be reported (truncated, zero-byte, 1x1, header bomb,
not-an-image). The extraction and demo tests reuse it: every `ok` entry must be
processed, every other entry listed as bad with its `reason`.

No TensorFlow import.
"""

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Size of the valid corpus images (width, height): above MIN_IMAGE_SIDE.
CORPUS_IMAGE_SIZE = (80, 60)
# Dimensions claimed by the header-bomb PNG (10 gigapixels).
BOMB_SIDE = 100_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE_RGB = 2
_PNG_BIT_DEPTH_16 = 16
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_ROTATE_90_CW = 6


@dataclasses.dataclass(frozen=True)
class CorpusEntry:
    """One file of the corpus.

    Attributes:
        name: file name inside the corpus folder.
        ok: True if `load_image_rgb` must load it.
        reason: for bad files, the expected `ImageLoadError.reason`.
        shape: for good files, the expected [H, W, 3] with default options.
    """

    name: str
    ok: bool
    reason: str = None
    shape: tuple = None


def _gradient_rgb(size=CORPUS_IMAGE_SIZE, seed=0):
    """A deterministic RGB test pattern of `size` = (width, height)."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1
    ).astype(np.int32)
    image += rng.integers(-10, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _png_chunk(kind, data):
    """Serialises one PNG chunk (length, type, data, CRC)."""
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png_rgb16(path, array):
    """Writes a 48-bit (16 bits per channel) RGB PNG, which Pillow can't write.

    Args:
        path: output file.
        array: np.uint16 [H, W, 3].
    """
    height, width = array.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, _PNG_BIT_DEPTH_16, _PNG_COLOR_TYPE_RGB, 0, 0, 0)
    rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))
    data = (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    Path(path).write_bytes(data)


def write_png_header_bomb(path, side=BOMB_SIDE):
    """Writes a tiny valid PNG whose header claims side x side pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, _PNG_COLOR_TYPE_RGB, 0, 0, 0)
    data = (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    Path(path).write_bytes(data)


def write_bad_image_corpus(directory):
    """Writes the good/bad image corpus into `directory`.

    Args:
        directory: folder to create / fill.

    Returns:
        dict file name -> CorpusEntry, in a stable order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = CORPUS_IMAGE_SIZE
    rgb = _gradient_rgb()
    shape = (height, width, 3)
    entries = []

    def good(name, writer, expected_shape=shape):
        writer(directory / name)
        entries.append(CorpusEntry(name, True, shape=expected_shape))

    def bad(name, writer, reason):
        writer(directory / name)
        entries.append(CorpusEntry(name, False, reason=reason))

    good("good_rgb.jpg", lambda p: Image.fromarray(rgb).save(p, quality=90))
    good("grayscale.png", lambda p: Image.fromarray(rgb[..., 0]).save(p))
    good("cmyk.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p))
    good("rgb_16bit.png", lambda p: write_png_rgb16(p, rgb.astype(np.uint16) * 257))
    good("gray_16bit.png", lambda p: Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(p))

    def write_alpha(p):
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        rgba[: height // 2, :, 3] = 0
        Image.fromarray(rgba, mode="RGBA").save(p)

    good("alpha.png", write_alpha)

    def write_palette(p):
        image = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE)
        image.info["transparency"] = 0
        image.save(p, transparency=0)

    good("palette_transparent.png", write_palette)
    good("palette.gif", lambda p: Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(p))

    def write_exif_rotated(p):
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = _EXIF_ROTATE_90_CW
        Image.fromarray(rgb).save(p, exif=exif.tobytes(), quality=90)

    # Default loading ignores EXIF: shape stays as stored.
    good("exif_rotated.jpg", write_exif_rotated)
    good("café_東京_ünïcødé.jpg", lambda p: Image.fromarray(rgb).save(p, quality=90))

    def write_truncated(p):
        full = directory / "_full.tmp.jpg"
        Image.fromarray(_gradient_rgb((320, 240), seed=1)).save(full, quality=95)
        data = full.read_bytes()
        full.unlink()
        p.write_bytes(data[: len(data) // 2])

    bad("truncated.jpg", write_truncated, "truncated")
    bad("zero_byte.jpg", lambda p: p.write_bytes(b""), "empty")
    bad("tiny_1x1.png", lambda p: Image.new("RGB", (1, 1), (10, 20, 30)).save(p), "too_small")
    bad("header_bomb.png", write_png_header_bomb, "too_large")
    bad(
        "not_an_image.jpg",
        lambda p: p.write_text("this is not an image\n", encoding="utf-8"),
        "not_an_image",
    )
    bad("空ファイル_émpty.png", lambda p: p.write_bytes(b""), "empty")
    return {e.name: e for e in entries}
