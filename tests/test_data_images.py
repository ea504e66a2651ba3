"""Tests of delg_tf.data.images on the good/bad image corpus."""

import numpy as np
import pytest

from delg_tf.data import images
from delg_tf.data.errors import DataError, ImageLoadError
from delg_tf.data.testing import CORPUS_IMAGE_SIZE, write_bad_image_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return directory, write_bad_image_corpus(directory)


def test_corpus_has_every_kind(corpus):
    _, entries = corpus
    reasons = {e.reason for e in entries.values() if not e.ok}
    assert reasons == {"truncated", "empty", "too_small", "too_large", "not_an_image"}
    assert any(not name.isascii() for name in entries)
    assert sum(e.ok for e in entries.values()) >= 8


def test_every_corpus_file_loaded_or_reported(corpus):
    directory, entries = corpus
    for name, entry in entries.items():
        array, error = images.try_load_image_rgb(directory / name)
        if entry.ok:
            assert error is None, f"{name}: {error}"
            assert array.dtype == np.uint8 and array.shape == entry.shape, name
        else:
            assert array is None, name
            assert isinstance(error, ImageLoadError)
            assert isinstance(error, DataError) and isinstance(error, ValueError)
            assert error.reason == entry.reason, (name, error)
            assert name in str(error) and "\n" not in str(error)


def test_conversions_preserve_content(corpus):
    directory, _ = corpus
    png_rgb = images.load_image_rgb(directory / "palette.gif")
    rgb16 = images.load_image_rgb(directory / "rgb_16bit.png")
    gray16 = images.load_image_rgb(directory / "gray_16bit.png")
    # Both 16-bit files hold v * 257 of the same 8-bit pattern: v comes back
    # exactly (scaled by 255/65535, not clipped at 255).
    np.testing.assert_array_equal(gray16[..., 0], rgb16[..., 1])
    assert gray16.std() > 10 and rgb16.std() > 10
    assert np.all(gray16[..., 0] == gray16[..., 2])
    assert np.abs(png_rgb.astype(int) - rgb16.astype(int)).mean() < 20


def test_sixteen_bit_scaling_exact(tmp_path):
    from PIL import Image

    values = np.linspace(0, 65535, 64 * 40).reshape(40, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    out = images.load_image_rgb(tmp_path / "g.png")[..., 0]
    expected = np.round(values / 65535.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_alpha_composite_and_drop(corpus):
    directory, _ = corpus
    composited = images.load_image_rgb(directory / "alpha.png")
    dropped = images.load_image_rgb(directory / "alpha.png", alpha="drop")
    half = CORPUS_IMAGE_SIZE[1] // 2
    assert np.all(composited[:half] == 255)
    np.testing.assert_array_equal(composited[half:], dropped[half:])
    black = images.load_image_rgb(directory / "alpha.png", background=(0, 0, 0))
    assert np.all(black[:half] == 0)


def test_exif_orientation_is_optional(corpus):
    directory, _ = corpus
    width, height = CORPUS_IMAGE_SIZE
    stored = images.load_image_rgb(directory / "exif_rotated.jpg")
    rotated = images.load_image_rgb(directory / "exif_rotated.jpg", apply_exif_orientation=True)
    assert stored.shape == (height, width, 3)
    assert rotated.shape == (width, height, 3)


def test_limits_are_parameters(corpus, tmp_path):
    directory, _ = corpus
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS"):
        images.load_image_rgb(directory / "good_rgb.jpg", max_pixels=100)
    tiny = images.load_image_rgb(directory / "tiny_1x1.png", min_side=1)
    assert tiny.shape == (1, 1, 3)
    with pytest.raises(ImageLoadError) as info:
        images.load_image_rgb(tmp_path / "does_not_exist.jpg")
    assert info.value.reason == "missing"
    with pytest.raises(ImageLoadError):
        images.load_image_rgb(tmp_path)


def test_list_image_files(corpus):
    directory, entries = corpus
    listed = {p.name for p in images.list_image_files(directory)}
    assert listed == set(entries)


def test_decoding_read_bytes_matches_loading_the_file(corpus):
    directory, entries = corpus
    for name in entries:
        path = directory / name
        for alpha in images.ALPHA_MODES:
            expected, expected_error = images.try_load_image_rgb(path, alpha=alpha)
            try:
                array, error = images.decode_image_rgb(path.read_bytes(), path, alpha=alpha), None
            except ImageLoadError as e:
                array, error = None, e
            if expected_error is None:
                assert error is None, (name, error)
                np.testing.assert_array_equal(array, expected, err_msg=name)
            else:
                assert (error.reason, str(error)) == (expected_error.reason, str(expected_error)), (
                    name
                )
