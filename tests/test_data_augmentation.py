"""Augmentation: shapes, ranges, determinism and math against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.data import augmentation as aug

RNG = np.random.default_rng(0)
IMAGE = tf.constant(RNG.uniform(0, 255, (90, 120, 3)).astype(np.float32))


def test_crop_box_respects_official_ranges():
    shape = tf.shape(IMAGE)
    area = 90 * 120
    found_partial = False
    for s in range(30):
        begin, size = aug.sample_crop_box(shape, [s, 7])
        begin, size = begin.numpy(), size.numpy()
        assert begin[2] == 0 and size[2] == -1
        h, w = size[:2]
        assert 0 <= begin[0] and begin[0] + h <= 90
        assert 0 <= begin[1] and begin[1] + w <= 120
        assert aug.AREA_RANGE[0] - 0.01 <= h * w / area <= 1.0
        if h * w < area:
            found_partial = True
            # Integer rounding of the sampled box loosens the ratio a bit.
            assert 0.75 * 0.9 <= w / h <= (4 / 3) * 1.1
    assert found_partial
    again = aug.sample_crop_box(shape, [3, 7])
    first = aug.sample_crop_box(shape, [3, 7])
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())


def test_full_crop_area_resize_matches_numpy_block_mean():
    image = RNG.uniform(0, 255, (64, 64, 3)).astype(np.float32)
    config = aug.AugmentationConfig(
        area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), min_object_covered=1.0
    )
    out = aug.random_crop_and_resize(tf.constant(image), 32, [0, 0], config)
    expected = image.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_flip_is_identity_or_mirror_and_both_happen():
    outcomes = set()
    for s in range(12):
        out = aug.random_flip(IMAGE, tf.constant([s, 1], tf.int64)).numpy()
        if np.array_equal(out, IMAGE.numpy()):
            outcomes.add("same")
        else:
            np.testing.assert_array_equal(out, IMAGE.numpy()[:, ::-1])
            outcomes.add("flip")
    assert outcomes == {"same", "flip"}


def test_brightness_is_a_constant_shift():
    image = tf.fill([8, 8, 3], 100.0)
    out = aug.color_jitter(image, [4, 2], brightness=0.2).numpy()
    delta = out - 100.0
    assert np.allclose(delta, delta.flat[0], atol=1e-3)
    assert abs(delta.flat[0]) <= 0.2 * 255 + 1e-3
    untouched = aug.color_jitter(IMAGE, [4, 2]).numpy()
    np.testing.assert_allclose(untouched, IMAGE.numpy(), atol=1e-3)


def test_training_augmentation_shapes_ranges_determinism():
    config = aug.AugmentationConfig(
        random_flip=True, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1
    )
    uint8 = tf.cast(IMAGE, tf.uint8)
    out = aug.augment_for_training(uint8, 40, [9, 9], config)
    assert out.shape == (40, 40, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255
    again = aug.augment_for_training(uint8, 40, [9, 9], config)
    np.testing.assert_array_equal(out.numpy(), again.numpy())
    other = aug.augment_for_training(uint8, 40, [9, 10], config)
    assert not np.array_equal(out.numpy(), other.numpy())
    graph = tf.function(lambda x, s: aug.augment_for_training(x, 40, s, config))
    np.testing.assert_allclose(graph(uint8, tf.constant([9, 9])).numpy(), out.numpy(), atol=1e-3)


def test_eval_resize_and_metric_center_crop():
    out = aug.resize_for_eval(IMAGE, 50)
    assert out.shape == (50, 50, 3)
    image = RNG.uniform(0, 255, (300, 400, 3)).astype(np.float32)
    resized = aug.resize_shorter_side(tf.constant(image), 256).numpy()
    assert resized.shape == (256, 341, 3)
    cropped = aug.metric_eval_preprocess(tf.constant(image)).numpy()
    oy, ox = (256 - 224) // 2, (341 - 224) // 2
    np.testing.assert_array_equal(cropped, resized[oy : oy + 224, ox : ox + 224])
    train = aug.metric_train_augment(tf.constant(image), [1, 2])
    assert train.shape == (224, 224, 3)


def test_element_seed_and_split():
    seed = aug.element_seed(5, tf.constant(3, tf.int64))
    assert seed.numpy().tolist() == [5, 3]
    seeds = aug.split_seed(seed).numpy()
    assert seeds.shape == (4, 2) and len({tuple(s) for s in seeds}) == 4


@pytest.mark.parametrize("size", [1, 7])
def test_tiny_inputs_do_not_crash(size):
    image = tf.fill([size, size, 3], 10.0)
    out = aug.augment_for_training(image, 16, [0, 0])
    np.testing.assert_allclose(out.numpy(), 10.0, atol=1e-4)
