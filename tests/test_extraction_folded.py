"""Batch-norm-folded inference view: same function as the Keras model, in every layout;
the native-bfloat16 detection and its warning."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.extraction import folded
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import (
    TINY_DELG_CONFIG,
    TinyDelgStandIn,
    random_image,
    tiny_delg_model,
)
from delg_tf.serving import delg_export

# TINY_DELG_CONFIG has two conv4 units, so the last one is an identity unit (the one
# that is evaluated only at the kept cells in the stride-16 layouts).
SCALES = (0.5, 1.0, 1.4142135)
CONFIG = delg_export.ExportConfig(
    image_scales=SCALES,
    global_scales_ind=(0, 2),
    max_feature_num=60,
    score_threshold=0.0,
    max_image_size=-1,
)
# Folding changes the rounding only; relative to each output's magnitude.
RELATIVE_TOL = 1e-5


def _model(seed=0, **overrides):
    return tiny_delg_model(seed, **overrides)


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-6)
    error = float(np.abs(got - want).max()) / scale
    assert error <= RELATIVE_TOL, f"{what}: max abs error {error:.2e} of the output's range"


LAYOUTS = [
    dict(backbone_layout="slim"),
    dict(backbone_layout="tf2_delf", attention_input="reconstruction"),
    dict(backbone_layout="keras", attention_use_bn=False),
    dict(backbone_layout="slim", block3_stride=False),
]


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
    for got, want, what in zip(
        view.local_head(s_keras), model.local_head(s_keras), ("attention", "descriptors")
    ):
        _assert_close(got, want, what)
    _assert_close(view.global_head(d_keras), model.global_head(d_keras), "global head")
    assert view.local_descriptor_dim == TINY_DELG_CONFIG["local_dim"]
    assert view.global_descriptor_dim == TINY_DELG_CONFIG["embedding_dim"]


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
    stored = sum(
        int(np.prod(shape))
        for name, shape in reader.get_variable_to_shape_map().items()
        if name.startswith("model_variables/")
    )
    assert stored == sum(int(np.prod(v.shape)) for v in used)
    image = random_image(64, 80, seed=6)
    want = DelgExtractor.from_model(model, CONFIG.to_delf_config(""), fold_batch_norm=False)
    got = DelgExtractor.from_saved_model(str(path))
    np.testing.assert_allclose(
        got(image).global_descriptor, want(image).global_descriptor, atol=1e-5
    )


def test_bfloat16_backbone_is_opt_in_close_and_really_bfloat16():
    model = _model(seed=7, backbone_layout="tf2_delf")
    config = CONFIG.to_delf_config("")
    if folded.bfloat16_convolution_error() is not None:
        # e.g. ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU: refused in one line, not a
        # oneDNN traceback at the first image.
        with pytest.raises(folded.BFloat16UnavailableError, match="--compute_dtype=float32"):
            DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
        return
    exact = DelgExtractor.from_model(model, config)
    fast = DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
    graph = fast.pyramid.extract.get_concrete_function().graph
    conv_dtypes = {
        op.get_attr("T")
        for function in graph._functions.values()
        for op in function.graph.get_operations()
        if op.type == "Conv2D"
    }
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


# /proc/cpuinfo excerpts (one core each): an AVX2-only desktop CPU, an AVX512 CPU
# without bfloat16 (Skylake-SP), a Cooper Lake (AVX512_BF16) and a Sapphire Rapids
# (AVX512_BF16 + AMX-BF16) server, and an aarch64 CPU (no x86 `flags` line).
CPUINFO_AVX2 = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) "
    "i7-8700\nflags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2\n"
)
CPUINFO_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
CPUINFO_COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
CPUINFO_SAPPHIRE_RAPIDS = (
    "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
    "avx512_fp16 amx_bf16 amx_tile amx_int8\n"
    "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
    "avx512_fp16 amx_bf16 amx_tile amx_int8\n"
)
CPUINFO_AARCH64 = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16\n"


@pytest.mark.parametrize(
    "cpuinfo,env,emulated",
    [
        (CPUINFO_AVX2, {}, "neither avx512_bf16 nor amx_bf16"),
        (CPUINFO_AVX512, {}, "neither avx512_bf16 nor amx_bf16"),
        (CPUINFO_COOPER_LAKE, {}, None),
        (CPUINFO_SAPPHIRE_RAPIDS, {}, None),
        ("fpu avx2 amx_bf16", {}, None),  # a bare flags list
        (CPUINFO_SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2"),
        (
            CPUINFO_SAPPHIRE_RAPIDS,
            {"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"},
            "caps oneDNN below AVX512_CORE_BF16",
        ),
        (CPUINFO_SAPPHIRE_RAPIDS, {"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, "DNNL_MAX_CPU_ISA"),
        # The new variable wins over the old spelling (oneDNN reads it first).
        (CPUINFO_SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "ALL", "DNNL_MAX_CPU_ISA": "AVX2"}, None),
        (CPUINFO_SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, None),
        (CPUINFO_SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX"}, None),
        (CPUINFO_SAPPHIRE_RAPIDS, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "TF_ENABLE_ONEDNN_OPTS=0"),
        (CPUINFO_SAPPHIRE_RAPIDS, {"TF_ENABLE_ONEDNN_OPTS": "1"}, None),
        # A cap cannot add what the CPU lacks.
        (CPUINFO_AVX2, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "neither"),
        # Unknown flags (another architecture, no /proc): no warning without evidence.
        (CPUINFO_AARCH64, {}, None),
        ("", {}, None),
    ],
)
def test_native_bfloat16_detection_from_cpuinfo_and_environment(cpuinfo, env, emulated):
    reason = folded.emulated_bfloat16_reason(cpuinfo, env)
    if emulated is None:
        assert reason is None
    else:
        assert reason is not None and emulated in reason


def test_cpu_flags_of_a_cpuinfo_text():
    assert {"avx2", "fma"} <= folded.cpu_flags(CPUINFO_AVX2)
    assert "Intel(R)" not in folded.cpu_flags(CPUINFO_AVX2)  # only the flags lines
    assert folded.cpu_flags(CPUINFO_AARCH64) is None


def _warnings(caplog):
    return [r for r in caplog.records if r.name == folded.__name__ and r.levelno == logging.WARNING]


def test_bfloat16_warning_is_one_line_and_only_where_emulated(caplog):
    caplog.set_level(logging.WARNING, logger=folded.__name__)
    message = folded.warn_if_bfloat16_emulated("bfloat16", cpuinfo_text=CPUINFO_AVX2, env={})
    assert [r.getMessage() for r in _warnings(caplog)] == [message]
    assert "\n" not in message and "slower than float32" in message
    assert "avx512_bf16" in message
    caplog.clear()
    assert (
        folded.warn_if_bfloat16_emulated("bfloat16", cpuinfo_text=CPUINFO_SAPPHIRE_RAPIDS, env={})
        is None
    )
    assert folded.warn_if_bfloat16_emulated("float32", cpuinfo_text=CPUINFO_AVX2, env={}) is None
    assert not _warnings(caplog)


def test_asking_an_extractor_for_bfloat16_warns_once_on_an_emulating_cpu(
    tmp_path, monkeypatch, caplog
):
    """The machine's /proc/cpuinfo replaced by an AVX2-only one (no environment change)."""
    model = _model(seed=9)
    config = CONFIG.to_delf_config("")
    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO_AVX2)
    monkeypatch.setattr(folded, "CPUINFO_PATH", str(fake))
    # An AVX2-only CPU runs bfloat16 emulated (whatever this process can do).
    monkeypatch.setattr(folded, "bfloat16_convolution_error", lambda: None)
    for variable in (folded.TF_ONEDNN_VARIABLE,) + folded.ONEDNN_ISA_CAP_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    caplog.set_level(logging.WARNING, logger=folded.__name__)
    DelgExtractor.from_model(model, config)  # float32: nothing to say
    assert not _warnings(caplog)
    DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
    assert len(_warnings(caplog)) == 1
    assert "slower than float32" in _warnings(caplog)[0].getMessage()
    caplog.clear()
    fake.write_text(CPUINFO_SAPPHIRE_RAPIDS)
    DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
    assert not _warnings(caplog)


def test_bfloat16_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(
        folded,
        "bfloat16_convolution_error",
        lambda: "AbortedError: could not create a primitive descriptor",
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    model = _model(seed=7, backbone_layout="tf2_delf")
    with pytest.raises(folded.BFloat16UnavailableError) as info:
        DelgExtractor.from_model(model, CONFIG.to_delf_config(""), compute_dtype="bfloat16")
    message = str(info.value)
    assert "\n" not in message and "ONEDNN_MAX_CPU_ISA=AVX2" in message
    assert "could not create a primitive descriptor" in message
    # float32 is unaffected.
    DelgExtractor.from_model(model, CONFIG.to_delf_config(""))


def test_bfloat16_probe_matches_running_a_bfloat16_convolution():
    """The probe's verdict is what a bfloat16 extraction then does here."""
    model = _model(seed=7, backbone_layout="tf2_delf")
    error = folded.bfloat16_convolution_error()
    if error is None:
        features = DelgExtractor.from_model(
            model, CONFIG.to_delf_config(""), compute_dtype="bfloat16"
        )(random_image(64, 64, seed=3))
        assert np.all(np.isfinite(features.global_descriptor))
    else:
        backbone = folded.fold_delg_model(model, "bfloat16").backbone
        with pytest.raises(tf.errors.OpError):
            tf.function(backbone.call_to_conv4)(tf.zeros([1, 64, 64, 3]))
