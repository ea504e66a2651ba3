"""Batch-norm-folded inference view: same function as the Keras model, in every layout."""

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.extraction import folded
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.models.delg import DelgModel, DelgModelConfig
from delg_tf.serving import delg_export

# Two conv4 units, so the last one is an identity unit (the one that is evaluated
# only at the kept cells in the stride-16 layouts).
BACKBONE_KWARGS = {"units": (1, 1, 2, 1)}
TINY = dict(num_classes=3, backbone="tiny", embedding_dim=16, local_dim=8, attention_hidden=8,
            arcface_scale_init=4.0, backbone_kwargs=BACKBONE_KWARGS)
SCALES = (0.5, 1.0, 1.4142135)
CONFIG = delg_export.ExportConfig(image_scales=SCALES, global_scales_ind=(0, 2),
                                  max_feature_num=60, score_threshold=0.0, max_image_size=-1)
# Folding changes the rounding only; relative to each output's magnitude.
RELATIVE_TOL = 1e-5


def _randomize_batch_norm(model, seed):
    """Non-trivial frozen statistics (fresh BN layers would fold to the identity)."""
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        name = variable.path
        shape = variable.shape
        if "moving_mean" in name or name.endswith("beta"):
            variable.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
        elif "moving_variance" in name:
            variable.assign(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        elif name.endswith("gamma"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))


def _model(seed=0, **overrides):
    model = DelgModel(DelgModelConfig(**{**TINY, **overrides}))
    model.build()
    _randomize_batch_norm(model, seed)
    return model


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-6)
    error = float(np.abs(got - want).max()) / scale
    assert error <= RELATIVE_TOL, f"{what}: max abs error {error:.2e} of the output's range"


LAYOUTS = [dict(backbone_layout="slim"),
           dict(backbone_layout="tf2_delf", attention_input="reconstruction"),
           dict(backbone_layout="keras", attention_use_bn=False),
           dict(backbone_layout="slim", block3_stride=False)]


@pytest.mark.parametrize("overrides", LAYOUTS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("height,width", [(64, 96), (75, 53)])
def test_folded_view_computes_the_keras_model(overrides, height, width):
    model = _model(**overrides)
    view = folded.fold_delg_model(model)
    images = model.preprocess(tf.constant(random_image(height, width, seed=1)[None]))
    s_keras = model.backbone.call_to_conv4(images)["conv4"]
    s_folded = view.backbone.call_to_conv4(images)["conv4"]
    _assert_close(s_folded, s_keras, "S (conv4)")
    d_keras = model.backbone.call_conv5(s_keras)
    _assert_close(view.backbone.call_conv5(s_keras), d_keras, "D (conv5)")
    for got, want, what in zip(view.local_head(s_keras), model.local_head(s_keras),
                               ("attention", "descriptors")):
        _assert_close(got, want, what)
    _assert_close(view.global_head(d_keras), model.global_head(d_keras), "global head")
    assert view.local_descriptor_dim == TINY["local_dim"]
    assert view.global_descriptor_dim == TINY["embedding_dim"]


def test_the_stride16_layouts_evaluate_the_last_conv4_unit_only_at_kept_cells():
    model = _model(backbone_layout="tf2_delf")
    view = folded.fold_delg_model(model)
    last = view.backbone.stages[2][-1]
    assert view.backbone.conv4_subsample and last.can_subsample()
    x = tf.random.stateless_normal([1, 9, 12, last.convs[0].kernel.shape[2]], seed=[1, 2])
    _assert_close(last.subsampled(x, 2), last(x)[:, ::2, ::2, :], "subsampled unit")
    # A strided convolution (the 7x7/2 stem) cannot be evaluated this way.
    with pytest.raises(ValueError, match="stride-1 convolution"):
        view.backbone.stem.subsampled(x, 2)


def test_in_memory_extractor_folds_by_default_and_matches_the_keras_path():
    model = _model(seed=3, backbone_layout="tf2_delf")
    config = CONFIG.to_delf_config("")
    default = DelgExtractor.from_model(model, config)
    keras_path = DelgExtractor.from_model(model, config, fold_batch_norm=False)
    assert isinstance(default.pyramid.model, folded.FoldedDelg)
    assert keras_path.pyramid.model is model
    image = random_image(90, 70, seed=4)
    got, want = default(image), keras_path(image)
    np.testing.assert_allclose(got.global_descriptor, want.global_descriptor, atol=1e-5)
    np.testing.assert_array_equal(got.locations, want.locations)
    np.testing.assert_allclose(got.descriptors, want.descriptors, atol=1e-4)
    np.testing.assert_allclose(got.attention, want.attention, rtol=1e-4, atol=1e-5)


def test_stand_ins_and_folded_models_are_not_folded_again():
    stand_in = TinyDelgStandIn()
    assert folded.inference_model(stand_in) is stand_in
    view = folded.fold_delg_model(_model())
    assert folded.inference_model(view) is view
    model = _model()
    assert folded.inference_model(model, fold_batch_norm=False) is model


def test_export_stores_folded_weights_as_variables(tmp_path):
    model = _model(seed=5)
    path = delg_export.export_saved_model(model, tmp_path / "export", CONFIG)
    loaded = tf.saved_model.load(str(path))
    view = folded.fold_delg_model(model)
    # Every folded weight the graph reads is a variable of the export (none baked
    # into the graph); the decoder is unused when attention reads S (the default).
    used = [v for v in view.variables if "/decoder/" not in v.name]
    assert sorted(v.name for v in loaded.model_variables) == sorted(v.name for v in used)
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    stored = sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
                 if name.startswith("model_variables/"))
    assert stored == sum(int(np.prod(v.shape)) for v in used)
    image = random_image(64, 80, seed=6)
    want = DelgExtractor.from_model(model, CONFIG.to_delf_config(""), fold_batch_norm=False)
    got = DelgExtractor.from_saved_model(str(path))
    np.testing.assert_allclose(got(image).global_descriptor, want(image).global_descriptor,
                               atol=1e-5)


def test_bfloat16_backbone_is_opt_in_close_and_really_bfloat16():
    model = _model(seed=7, backbone_layout="tf2_delf")
    config = CONFIG.to_delf_config("")
    exact = DelgExtractor.from_model(model, config)
    fast = DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
    graph = fast.pyramid.extract.get_concrete_function().graph
    conv_dtypes = {op.get_attr("T") for function in graph._functions.values()
                   for op in function.graph.get_operations() if op.type == "Conv2D"}
    assert tf.bfloat16 in conv_dtypes
    image = random_image(96, 96, seed=8)
    got, want = fast(image), exact(image)
    difference = np.abs(got.global_descriptor - want.global_descriptor).max()
    # bfloat16 keeps 8 mantissa bits: close, but not float32-close.
    assert 1e-6 < difference < 5e-2, difference
    assert got.descriptors.dtype == np.float32
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        folded.inference_model(model, compute_dtype="float16")
    with pytest.raises(ValueError, match="fold_batch_norm"):
        DelgExtractor.from_model(model, config, fold_batch_norm=False, compute_dtype="bfloat16")
