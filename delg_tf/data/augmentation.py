"""Training and evaluation image augmentation (tf ops only, stateless seeds).

DELG training (Cao et al. ECCV 2020, sec. 4.1: "random cropping / aspect
ratio distortion" then resize to 512x512) follows the official DELF reader
`delf/python/datasets/google_landmarks_dataset/googlelandmarks.py`
(`_ImageNetCrop`): `sample_distorted_bounding_box` with min_object_covered
0.1, aspect ratio in [3/4, 4/3], area in [0.08, 1.0], 100 attempts, then an
area resize to image_size x image_size; random reflection is off there by
default (`random_reflection = False`) and an option here, as is colour jitter.

The metric-learning recipe (Glocal Retriever / proxy-anchor): random resized
crop to 224 + horizontal flip for training, resize of the shorter side to 256
+ centre crop 224 for testing.

All random functions are stateless: they take a `seed` int tensor of shape
[2] and give the same output for the same seed (`split_seed` derives
independent seeds). Images are float32 in [0, 255] in and out; normalisation
for the backbone is the model's job. No tensorflow-addons (unmaintained, broken
on TF >= 2.16): only tf.image / tf.raw_ops.
"""

import dataclasses

import tensorflow as tf

PIXEL_MAX = 255.0
# Official DELF `_DataAugmentationParams` defaults.
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.08, 1.0)
MAX_ATTEMPTS = 100
DELG_IMAGE_SIZE = 512
# Metric-learning (CUB) sizes.
METRIC_TRAIN_SIZE = 224
METRIC_RESIZE_SIZE = 256
_NUM_SUB_SEEDS = 4


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Parameters of `augment_for_training`.

    Defaults are the official DELF reader's, with flip and colour jitter off.

    Attributes:
        min_object_covered: see tf.image.sample_distorted_bounding_box.
        aspect_ratio_range: allowed crop width/height ratios (before resize).
        area_range: allowed crop area as a fraction of the image.
        max_attempts: crop sampling attempts before using the full image.
        random_flip: random horizontal flip with probability 0.5.
        brightness: max additive brightness delta in [0, 1] units (0 = off).
        contrast: max relative contrast change, factor in [1-c, 1+c] (0 = off).
        saturation: max relative saturation change (0 = off).
        hue: max hue delta in [0, 0.5] (0 = off).
        resize_method: tf.image.resize method after cropping ("area" as in
            the official reader).
    """

    min_object_covered: float = MIN_OBJECT_COVERED
    aspect_ratio_range: tuple = ASPECT_RATIO_RANGE
    area_range: tuple = AREA_RANGE
    max_attempts: int = MAX_ATTEMPTS
    random_flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    resize_method: str = "area"


def split_seed(seed, num=_NUM_SUB_SEEDS):
    """Derives `num` independent stateless seeds from one.

    Args:
        seed: int tensor [2].
        num: number of seeds.

    Returns:
        int64 tensor [num, 2].
    """
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num=num)


def element_seed(base_seed, index):
    """Seed of dataset element `index` for a pipeline seeded with `base_seed`.

    Returns:
        int64 tensor [2] = [base_seed, index].
    """
    return tf.stack([tf.cast(base_seed, tf.int64), tf.cast(index, tf.int64)])


def sample_crop_box(
    image_shape,
    seed,
    min_object_covered=MIN_OBJECT_COVERED,
    aspect_ratio_range=ASPECT_RATIO_RANGE,
    area_range=AREA_RANGE,
    max_attempts=MAX_ATTEMPTS,
):
    """Samples a random crop like the official `_ImageNetCrop`.

    Args:
        image_shape: int tensor [3] (height, width, channels).
        seed: int tensor [2].
        min_object_covered, aspect_ratio_range, area_range, max_attempts: as
            tf.image.stateless_sample_distorted_bounding_box.

    Returns:
        (begin, size): int32 tensors [3] for tf.slice; the whole image when no
        valid box is found in `max_attempts`.
    """
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32),
        bounding_boxes=whole_image,
        seed=tf.cast(seed, tf.int64),
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def random_crop_and_resize(image, image_size, seed, config=AugmentationConfig()):
    """Random crop / aspect-ratio distortion, then resize to a square.

    Args:
        image: float32 [H, W, 3].
        image_size: output side S.
        seed: int tensor [2].
        config: AugmentationConfig (crop ranges, resize method).

    Returns:
        float32 [S, S, 3].
    """
    begin, size = sample_crop_box(
        tf.shape(image),
        seed,
        config.min_object_covered,
        config.aspect_ratio_range,
        config.area_range,
        config.max_attempts,
    )
    cropped = tf.slice(image, begin, size)
    resized = tf.image.resize(cropped, [image_size, image_size], method=config.resize_method)
    return tf.ensure_shape(resized, [image_size, image_size, 3])


def random_flip(image, seed):
    """Horizontal flip with probability 0.5 (stateless)."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def color_jitter(image, seed, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """Random brightness, contrast, saturation and hue (stateless).

    Operates on [0, 1] intensities internally; zero amounts are skipped.

    Args:
        image: float32 [H, W, 3] in [0, 255].
        seed: int tensor [2].
        brightness: max additive delta in [0, 1] units.
        contrast: factor drawn in [1 - contrast, 1 + contrast].
        saturation: factor drawn in [1 - saturation, 1 + saturation].
        hue: max hue delta (<= 0.5).

    Returns:
        float32 [H, W, 3] in [0, 255].
    """
    seeds = split_seed(seed)
    out = image / PIXEL_MAX
    if brightness > 0:
        out = tf.image.stateless_random_brightness(out, brightness, seeds[0])
    if contrast > 0:
        out = tf.image.stateless_random_contrast(out, 1.0 - contrast, 1.0 + contrast, seeds[1])
    if saturation > 0:
        out = tf.image.stateless_random_saturation(
            out, 1.0 - saturation, 1.0 + saturation, seeds[2]
        )
    if hue > 0:
        out = tf.image.stateless_random_hue(out, hue, seeds[3])
    return tf.clip_by_value(out, 0.0, 1.0) * PIXEL_MAX


def augment_for_training(image, image_size, seed, config=AugmentationConfig()):
    """DELG training augmentation: crop/aspect distortion, resize, flip.

    Args:
        image: uint8 or float32 [H, W, 3] with values in [0, 255].
        image_size: output side S (512 in the paper).
        seed: int tensor [2].
        config: AugmentationConfig.

    Returns:
        float32 [S, S, 3] in [0, 255].
    """
    image = tf.cast(image, tf.float32)
    seeds = split_seed(seed)
    out = random_crop_and_resize(image, image_size, seeds[0], config)
    if config.random_flip:
        out = random_flip(out, seeds[1])
    if config.brightness or config.contrast or config.saturation or config.hue:
        out = color_jitter(
            out, seeds[2], config.brightness, config.contrast, config.saturation, config.hue
        )
    return tf.clip_by_value(out, 0.0, PIXEL_MAX)


def resize_for_eval(image, image_size):
    """Evaluation preprocessing of the official reader: plain square resize.

    Args:
        image: [H, W, 3] in [0, 255].
        image_size: output side S.

    Returns:
        float32 [S, S, 3] (aspect ratio not preserved, as in the official
        `_ParseFunction` without augmentation).
    """
    resized = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
    return tf.ensure_shape(resized, [image_size, image_size, 3])


def center_crop_offsets(height, width, crop_size):
    """Top-left corner of a centred crop (floor of half the margin).

    Returns:
        (offset_y, offset_x) int32 tensors.
    """
    offset_y = (tf.cast(height, tf.int32) - crop_size) // 2
    offset_x = (tf.cast(width, tf.int32) - crop_size) // 2
    return offset_y, offset_x


def resize_shorter_side(image, size):
    """Resizes so that the shorter side equals `size` (bilinear).

    Returns:
        float32 [H', W', 3] with min(H', W') == size.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    return tf.image.resize(tf.cast(image, tf.float32), new_shape)


def metric_train_augment(image, seed, crop_size=METRIC_TRAIN_SIZE, random_flip_enabled=True):
    """Random resized crop (area 0.08-1, aspect 3/4-4/3) + flip.

    The torchvision `RandomResizedCrop` + `RandomHorizontalFlip` recipe of
    metric-learning code (proxy-anchor, Glocal Retriever), with tf ops.

    Args:
        image: [H, W, 3] in [0, 255].
        seed: int tensor [2].
        crop_size: output side.
        random_flip_enabled: apply the random horizontal flip.

    Returns:
        float32 [crop_size, crop_size, 3] in [0, 255].
    """
    config = AugmentationConfig(
        min_object_covered=0.0, resize_method="bilinear", random_flip=random_flip_enabled
    )
    return augment_for_training(image, crop_size, seed, config)


def metric_eval_preprocess(image, resize_size=METRIC_RESIZE_SIZE, crop_size=METRIC_TRAIN_SIZE):
    """Resize the shorter side to `resize_size`, then centre crop.

    Returns:
        float32 [crop_size, crop_size, 3] in [0, 255].
    """
    resized = resize_shorter_side(image, resize_size)
    shape = tf.shape(resized)
    offset_y, offset_x = center_crop_offsets(shape[0], shape[1], crop_size)
    cropped = resized[offset_y : offset_y + crop_size, offset_x : offset_x + crop_size]
    return tf.ensure_shape(cropped, [crop_size, crop_size, 3])
