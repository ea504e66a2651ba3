"""In-graph pyramid: per-scale equivalence, selection, top-K, no retracing, conv5 skipping."""

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.extraction import geometry
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.pyramid import PyramidExtractor
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig

SCALES = (0.5, 0.70710677, 1.0, 1.4142135)
GLOBAL_IND = (1, 2, 3)


@pytest.fixture(scope="module")
def model():
    return TinyDelgStandIn()


@pytest.fixture(scope="module")
def pyramid(model):
    return PyramidExtractor(model)


def _single_scale(model, image, scale):
    size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
    resized = tf.image.resize(model.preprocess(image[None]), size)
    s = model.backbone.call_to_conv4(resized)["conv4"]
    attention, descriptors = model.local_head(s)
    global_raw = model.global_head(model.backbone.call_conv5(s))
    return attention[0].numpy(), descriptors[0].numpy(), global_raw[0].numpy()


def test_global_descriptor_is_mean_of_separate_scales(model, pyramid):
    image = random_image(77, 101, seed=3)
    raw = pyramid(image, SCALES, abs_thres=0.0, global_scales_ind=GLOBAL_IND)
    separate = np.stack([_single_scale(model, image, SCALES[i])[2] for i in GLOBAL_IND])
    np.testing.assert_allclose(raw["global_descriptors"], separate, rtol=1e-4, atol=1e-4)
    config = ExportConfig(
        image_scales=SCALES, global_scales_ind=GLOBAL_IND, score_threshold=0.0, max_image_size=-1
    ).to_delf_config("")
    final = DelgExtractor.from_model(model, config)(image).global_descriptor
    per_scale = separate / np.linalg.norm(separate, axis=1, keepdims=True)
    mean = per_scale.mean(axis=0)
    np.testing.assert_allclose(final, mean / np.linalg.norm(mean), atol=1e-5)


def test_local_features_match_a_single_scale_by_hand(model, pyramid):
    image = random_image(64, 96, seed=5)
    scale = 0.70710677
    attention, descriptors, _ = _single_scale(model, image, scale)
    threshold = float(np.median(attention))
    raw = pyramid(image, [scale], max_feature_num=1000, abs_thres=threshold, global_scales_ind=[0])
    keep = attention.reshape(-1) >= threshold
    assert raw["scores"].shape == (keep.sum(), 1)
    # Sorted by descending score (NMS with IoU 1.0 only sorts).
    assert np.all(np.diff(raw["scores"][:, 0]) <= 0)
    order = np.argsort(-attention.reshape(-1)[keep], kind="stable")
    boxes = geometry.receptive_boxes_np(*attention.shape[:2])[keep][order] / np.float32(scale)
    np.testing.assert_allclose(raw["boxes"], boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(
        raw["features"],
        descriptors.reshape(-1, descriptors.shape[-1])[keep][order],
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(raw["scales"], 1.0 / np.float32(scale))


def test_top_k_scale_order_and_no_retracing(pyramid):
    first = pyramid(
        random_image(70, 50, seed=1),
        SCALES,
        max_feature_num=7,
        abs_thres=0.0,
        global_scales_ind=[3, 0],
    )
    assert first["boxes"].shape == (7, 4) and first["features"].shape == (7, 128)
    assert first["global_descriptors"].shape[0] == 2
    all_scores = pyramid(
        random_image(70, 50, seed=1),
        SCALES,
        max_feature_num=10**6,
        abs_thres=0.0,
        global_scales_ind=[0, 3],
    )
    np.testing.assert_allclose(first["scores"][:, 0], all_scores["scores"][:7, 0])
    # Global rows in increasing scale index whatever the order of the indices.
    np.testing.assert_allclose(first["global_descriptors"], all_scores["global_descriptors"])
    pyramid(random_image(41, 83, seed=2), SCALES[:2], abs_thres=0.0, global_scales_ind=[1])
    assert pyramid.extract.experimental_get_tracing_count() == 1


class _CountingStandIn(TinyDelgStandIn):
    """Counts conv5 executions at run time (not at trace time)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv5_runs = tf.Variable(0, dtype=tf.int64, trainable=False)
        backbone_conv5 = self.backbone.call_conv5

        def counting_conv5(s, training=False):
            with tf.control_dependencies([self.conv5_runs.assign_add(1)]):
                return backbone_conv5(tf.identity(s), training=training)

        self.backbone.call_conv5 = counting_conv5


def test_conv5_only_at_global_scales():
    model = _CountingStandIn()
    extractor = PyramidExtractor(model)
    model.conv5_runs.assign(0)
    raw = extractor(random_image(48, 48), SCALES, abs_thres=0.0, global_scales_ind=[2])
    assert raw["global_descriptors"].shape[0] == 1
    assert int(model.conv5_runs.numpy()) == 1
    model.conv5_runs.assign(0)
    raw = extractor(random_image(48, 48), SCALES, abs_thres=0.0, global_scales_ind=[])
    assert raw["global_descriptors"].shape[0] == 0
    assert int(model.conv5_runs.numpy()) == 0


def test_local_and_global_only_modes(model):
    image = random_image(40, 56)
    local = PyramidExtractor(model, mode="local")(image, SCALES, abs_thres=0.0)
    assert set(local) == {"boxes", "features", "scales", "scores"}
    global_only = PyramidExtractor(model, mode="global")(image, SCALES, global_scales_ind=[0, 2])
    assert set(global_only) == {"global_descriptors"}
    assert global_only["global_descriptors"].shape == (2, 2048)
    with pytest.raises(ValueError, match="mode must be one of"):
        PyramidExtractor(model, mode="both")
