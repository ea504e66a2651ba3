"""Image normalisation conventions of the DELG model families."""

import tensorflow as tf

# (x - offset) / scale, x in [0, 255], RGB.
DELF_PIXEL_OFFSET = 127.5  # TF2 DELF/DELG: (x / 255 - 0.5) / 0.5.
DELF_PIXEL_SCALE = 127.5
DELF_TF1_PIXEL_OFFSET = 128.0  # Released TF1 DELG graphs: (x - 128) / 128.
DELF_TF1_PIXEL_SCALE = 128.0
# Caffe-style ImageNet means (BGR order), as keras.applications ResNet expects.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
# VGG-style ImageNet means (RGB order), as tf-slim's resnet_v1 checkpoints expect
# (slim `vgg_preprocessing`: mean subtraction, no scaling).
VGG_RGB_MEANS = (123.68, 116.78, 103.94)

NORMALIZATIONS = ("delf", "delf_tf1", "caffe", "vgg")


def normalize_images(images, mode="delf"):
    """Maps RGB images in [0, 255] to the backbone's input range.

    Args:
      images: uint8 or float tensor [..., H, W, 3], RGB, values in [0, 255].
      mode: "delf" ((x - 127.5) / 127.5, the TF2 DELF/DELG convention),
        "delf_tf1" ((x - 128) / 128, the released TF1 DELG graphs) or "caffe"
        (RGB->BGR and ImageNet mean subtraction, for keras.applications weights)
        or "vgg" (RGB ImageNet mean subtraction, for tf-slim resnet_v1 ImageNet
        checkpoints).

    Returns:
      float32 tensor of the same shape.
    """
    x = tf.cast(images, tf.float32)
    if mode == "delf":
        return (x - DELF_PIXEL_OFFSET) / DELF_PIXEL_SCALE
    if mode == "delf_tf1":
        return (x - DELF_TF1_PIXEL_OFFSET) / DELF_TF1_PIXEL_SCALE
    if mode == "caffe":
        return x[..., ::-1] - tf.constant(CAFFE_BGR_MEANS, tf.float32)
    if mode == "vgg":
        return x - tf.constant(VGG_RGB_MEANS, tf.float32)
    raise ValueError(f"image normalisation must be one of {NORMALIZATIONS}, received {mode!r}.")
