"""SuperGlobal pooling baked into the DELG export (GeM+, regional-GeM, Scale-GeM, ReLU+).

Every exported / extracted global descriptor is compared with an independent numpy
transcription of the modules (Shao et al. ICCV 2023) computed from the Keras model's
own conv5 maps; the ReLU+ oracle is a Keras forward of the backbone's layers that
clamps the residual outputs, checked first against the plain backbone with threshold 0.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from no_delg_tf import BLOCK_DELG_TF_IMPORTS

from delg_tf.configs import ConfigError
from delg_tf.extraction import config as config_lib
from delg_tf.extraction import folded, pyramid, superglobal
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import random_image, tiny_delg_model
from delg_tf.serving import delg_export

SCALES = (0.5, 1.0, 1.4142135)
GLOBAL_SCALES_IND = (1, 2)  # conv5 maps of 5x6 and 8x9 cells for IMAGE_SHAPE.
IMAGE_SHAPE = (160, 192)
CONFIG = config_lib.ExportConfig(
    image_scales=SCALES,
    global_scales_ind=GLOBAL_SCALES_IND,
    max_feature_num=50,
    score_threshold=0.0,
    max_image_size=-1,
    warmup=False,
)
ALL = config_lib.SUPERGLOBAL_MODULES
CASES = [(m,) for m in ALL] + [ALL]
# Folded vs Keras graphs differ by rounding only: relative to each output's range.
RELATIVE_TOL = 2e-5
# A module must move the descriptor by far more than the tolerance to be tested at all.
MIN_EFFECT = 100 * RELATIVE_TOL
# Reference values (ShihaoShao-GH/SuperGlobal gemp.py, rgem.py, relup.py), typed here.
GEM_PLUS_P, GEM_PLUS_EPS = 4.6, 1e-8
RGEM_P, RGEM_WINDOW, RGEM_MIX = 2.5, 5, 0.5
RELU_PLUS_FLOOR = 0.014
SUBPROCESS_TIMEOUT_S = 300


def _model(seed=0, **overrides):
    return tiny_delg_model(seed, **overrides)


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-6)


def _assert_close(got, want, what, tol=RELATIVE_TOL):
    error = _relative_error(got, want)
    assert error <= tol, f"{what}: max abs error {error:.2e} of the output's range"


# ----------------------------------------------------------------------------- oracle


def _oracle_conv4_relu_plus(backbone, images, floor):
    """Keras ResNet conv1..conv4 with the residual outputs of conv2_x..conv4_x clamped
    below at `floor` (floor 0: the ReLU, i.e. the plain backbone)."""
    x = backbone.stem(images, training=False)
    if backbone.pool1_pad is not None:
        x = backbone.pool1_pad(x)
    x = backbone.pool1(x)
    for blocks in backbone.stages[:3]:
        for block in blocks:
            y = block.conv_3(block.conv_2(block.conv_1(x, training=False), training=False))
            if block.shortcut is not None:
                residual = block.shortcut(x, training=False)
            else:
                residual = x[:, :: block.strides, :: block.strides, :]
            x = tf.constant(np.maximum((residual + y).numpy(), np.float32(floor)))
    if backbone.conv4_subsample:
        x = x[:, ::2, ::2, :]
    return x


def _oracle_conv5(model, image, scale, relu_plus=False):
    """conv5 map D [1, h, w, C] of the Keras model at one pyramid scale (the pyramid's
    resize: round-half-even of float32 H, W times the scale, bilinear)."""
    normalized = model.preprocess(tf.constant(image[None]))
    size = np.round(np.float32(image.shape[:2]) * np.float32(scale)).astype(np.int32)
    resized = tf.image.resize(normalized, size)
    if relu_plus:
        conv4 = _oracle_conv4_relu_plus(model.backbone, resized, RELU_PLUS_FLOOR)
    else:
        conv4 = model.backbone.call_to_conv4(resized)["conv4"]
    return model.backbone.call_conv5(conv4).numpy().astype(np.float64)


def _np_gem(d, p, eps):
    return np.mean(np.maximum(d, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def _np_regional_gem(d):
    """0.5 * (mean_5x5 x^2.5)^(1/2.5) + 0.5 * x on the reflection-padded map (numpy's
    "reflect" = torch ReflectionPad2d); the identity on maps too small to pad."""
    pad = (RGEM_WINDOW - 1) // 2
    if min(d.shape[1:3]) <= pad:
        return d
    padded = np.pad(np.maximum(d, 0.0), ((0, 0), (pad, pad), (pad, pad), (0, 0)), "reflect")
    windows = sliding_window_view(padded, (RGEM_WINDOW, RGEM_WINDOW), axis=(1, 2))
    pooled = np.mean(windows**RGEM_P, axis=(-2, -1)) ** (1.0 / RGEM_P)
    return RGEM_MIX * pooled + (1.0 - RGEM_MIX) * d


def _np_l2(x, axis=-1):
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), 1e-12))


def oracle_global(model, image, modules, scales=SCALES, global_scales_ind=GLOBAL_SCALES_IND):
    """(raw per-scale descriptors [G, D], final descriptor [D]) in numpy."""
    kernel = model.whitening.kernel.numpy().astype(np.float64)
    bias = model.whitening.bias.numpy().astype(np.float64)
    rows = []
    for index in global_scales_ind:
        d = _oracle_conv5(model, image, scales[index], relu_plus="relu_plus" in modules)
        if "regional_gem" in modules:
            d = _np_regional_gem(d)
        if "gem_plus" in modules:
            pooled = _np_gem(d, GEM_PLUS_P, GEM_PLUS_EPS)
        else:
            pooled = _np_gem(d, float(model.gem.power.numpy()), model.gem.eps)
        rows.append((pooled @ kernel + bias)[0])
    raw = np.stack(rows)
    per_scale = _np_l2(raw)
    combined = per_scale.max(axis=0) if "scale_gem" in modules else per_scale.sum(axis=0)
    return raw, _np_l2(combined)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def image():
    return random_image(*IMAGE_SHAPE, seed=5)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """{(modules, folded): export path} for no modules, each module, all (folded), and
    all with the Keras layers."""
    root = tmp_path_factory.mktemp("superglobal")
    paths = {}
    for modules, fold in [((), True)] + [(c, True) for c in CASES] + [(ALL, False)]:
        name = ("-".join(modules) or "plain") + ("" if fold else "-keras")
        config = dataclasses.replace(CONFIG, superglobal=modules)
        paths[modules, fold] = delg_export.export_saved_model(
            model, root / name, config, fold_batch_norm=fold
        )
    return paths


def _serve(path, image):
    """(serving_default outputs, serving_image_bytes outputs) of a reloaded export."""
    loaded = tf.saved_model.load(str(path))
    default = loaded.signatures["serving_default"](
        input_image=tf.constant(image),
        input_scales=tf.constant(SCALES, tf.float32),
        input_max_feature_num=tf.constant(CONFIG.max_feature_num),
        input_abs_thres=tf.constant(CONFIG.score_threshold),
        input_global_scales_ind=tf.constant(GLOBAL_SCALES_IND, tf.int32),
    )
    by_bytes = loaded.signatures["serving_image_bytes"](image_bytes=tf.io.encode_png(image))
    return (
        {k: v.numpy() for k, v in default.items()},
        {k: v.numpy() for k, v in by_bytes.items()},
    )


def _signature_spec(path, name):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    signature = proto.meta_graphs[0].signature_def[name]

    def spec(infos):
        return {
            k: (v.name, v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in infos.items()
        }

    return spec(signature.inputs), spec(signature.outputs)


# ----------------------------------------------------------------------------- config


def test_config_canonical_order_all_and_errors():
    config = config_lib.ExportConfig(superglobal=("scale_gem", "gem_plus"))
    assert config.superglobal == ("gem_plus", "scale_gem")
    assert config_lib.ExportConfig(superglobal=("all",)).superglobal == ALL
    assert config_lib.ExportConfig().superglobal == ()
    assert config_lib.canonical_superglobal("relu_plus,regional_gem") == (
        "regional_gem",
        "relu_plus",
    )
    with pytest.raises(ConfigError, match="--superglobal.*gem_plus, regional_gem.*unknown: gem"):
        config_lib.ExportConfig(superglobal=("gem",))
    with pytest.raises(ConfigError, match="repeated: gem_plus"):
        config_lib.ExportConfig(superglobal=("gem_plus", "gem_plus"))
    with pytest.raises(ConfigError, match="--superglobal.*local.*--noexport_global"):
        config_lib.ExportConfig(mode="local", superglobal=("gem_plus",))
    with pytest.raises(ConfigError, match="--superglobal must be empty when only local"):
        DelgExtractor.from_model(
            _model(), config_lib.ExportConfig(mode="local").to_delf_config(""), superglobal=ALL
        )
    assert config_lib.ExportConfig(mode="local").superglobal == ()


def test_asset_round_trip_and_bad_asset(tmp_path):
    for modules in [()] + CASES:
        (tmp_path / config_lib.ASSETS_EXTRA_DIR).mkdir(exist_ok=True)
        path = config_lib.superglobal_asset_path(tmp_path)
        path.write_text(json.dumps(superglobal.superglobal_asset(modules)))
        assert config_lib.read_superglobal_asset(tmp_path) == modules
    asset = json.loads(path.read_text())
    assert asset["gem_plus_p"] == GEM_PLUS_P and asset["relu_plus_threshold"] == RELU_PLUS_FLOOR
    assert asset["aggregation"] == "max"
    # ExportConfig round trip: the DelfConfig asset plus the SuperGlobal asset (scales
    # exact in float32, the DelfConfig field type).
    config = dataclasses.replace(CONFIG, image_scales=(0.5, 1.0, 1.5), superglobal=ALL)
    again = config_lib.ExportConfig.from_delf_config(
        config.to_delf_config(),
        warmup=CONFIG.warmup,
        superglobal=config_lib.read_superglobal_asset(tmp_path),
    )
    assert again == config
    path.write_text(json.dumps({"modules": ["gem_plus", "mac"]}))
    with pytest.raises(ValueError, match=f"{path}.*modules.*mac"):
        config_lib.read_superglobal_asset(tmp_path)
    path.write_text("not json")
    with pytest.raises(ValueError, match=str(path)):
        config_lib.read_superglobal_asset(tmp_path)
    path.unlink()
    assert config_lib.read_superglobal_asset(tmp_path) == ()


# ----------------------------------------------------------------------- the oracle


def test_relu_plus_oracle_with_floor_zero_is_the_backbone(model, image):
    resized = model.preprocess(tf.constant(image[None], tf.float32))
    plain = model.backbone.call_to_conv4(resized)["conv4"].numpy()
    np.testing.assert_array_equal(
        _oracle_conv4_relu_plus(model.backbone, resized, 0.0).numpy(), plain
    )


def test_regional_gem_is_the_identity_on_maps_too_small_to_pad():
    rng = np.random.default_rng(0)
    for h, w in [(2, 2), (2, 7), (3, 3), (4, 6)]:
        d = rng.uniform(0.0, 2.0, (1, h, w, 5)).astype(np.float32)
        want = _np_regional_gem(d.astype(np.float64))
        _assert_close(superglobal.regional_gem_or_identity(tf.constant(d)), want, f"{h}x{w}")
        dynamic = tf.function(
            superglobal.regional_gem_or_identity,
            input_signature=[tf.TensorSpec([None, None, None, 5], tf.float32)],
        )
        _assert_close(dynamic(tf.constant(d)), want, f"{h}x{w} dynamic")


# ----------------------------------------------------------------------------- export


def test_default_export_is_the_plain_delg_export(model, exports, image):
    inference = folded.inference_model(model)
    assert superglobal.superglobal_inference(inference, ()) is inference
    path = exports[(), True]
    assert not config_lib.superglobal_asset_path(path).exists()
    plain = pyramid.PyramidExtractor(inference, iou_threshold=CONFIG.iou_threshold)
    want = plain(image, SCALES, CONFIG.max_feature_num, 0.0, GLOBAL_SCALES_IND)
    default, by_bytes = _serve(path, image)
    for key, value in want.items():
        np.testing.assert_array_equal(default[key], value, err_msg=key)
    raw, final = oracle_global(model, image, ())
    _assert_close(default["global_descriptors"], raw, "plain raw")
    _assert_close(by_bytes["global_descriptor"], final, "plain final")


@pytest.mark.parametrize("modules", CASES, ids="-".join)
def test_export_matches_the_numpy_transcription(model, exports, image, modules):
    default, by_bytes = _serve(exports[modules, True], image)
    raw, final = oracle_global(model, image, modules)
    _assert_close(default["global_descriptors"], raw, "serving_default global_descriptors")
    _assert_close(by_bytes["global_descriptor"], final, "serving_image_bytes global_descriptor")
    plain_raw, plain_final = oracle_global(model, image, ())
    changed = raw if modules != ("scale_gem",) else final
    unchanged = plain_raw if modules != ("scale_gem",) else plain_final
    assert _relative_error(changed, unchanged) > MIN_EFFECT, "the module changes nothing here"
    if modules == ("scale_gem",):  # Scale-GeM only aggregates: the raw rows are DELG's.
        _assert_close(default["global_descriptors"], plain_raw, "scale_gem raw rows")


@pytest.mark.parametrize("modules", [("relu_plus",), ALL], ids="-".join)
def test_local_features_are_those_of_the_plain_backbone(exports, image, modules):
    plain, plain_bytes = _serve(exports[(), True], image)
    default, by_bytes = _serve(exports[modules, True], image)
    for key in ("boxes", "features", "scales", "scores"):
        np.testing.assert_array_equal(default[key], plain[key], err_msg=key)
    for key in ("locations", "descriptors", "scales", "attention"):
        np.testing.assert_array_equal(by_bytes[key], plain_bytes[key], err_msg=key)


def test_serving_default_interface_is_unchanged(exports):
    plain = _signature_spec(exports[(), True], "serving_default")
    for key, path in exports.items():
        assert _signature_spec(path, "serving_default") == plain, key
        assert _signature_spec(path, "serving_image_bytes") == _signature_spec(
            exports[(), True], "serving_image_bytes"
        )
    assert json.loads(config_lib.superglobal_asset_path(exports[ALL, True]).read_text())[
        "modules"
    ] == list(ALL)


@pytest.mark.parametrize("modules", [("scale_gem",), ALL], ids="-".join)
def test_host_extractor_learns_the_aggregation_and_equals_from_model(
    model, exports, image, modules
):
    path = exports[modules, True]
    extractor = DelgExtractor.from_saved_model(path)
    assert extractor.raw_fn.superglobal == modules and extractor.global_aggregation == "max"
    _, by_bytes = _serve(path, image)
    features = extractor(image)
    np.testing.assert_allclose(features.global_descriptor, by_bytes["global_descriptor"], atol=1e-6)
    _assert_close(features.global_descriptor, oracle_global(model, image, modules)[1], "host")
    in_memory = DelgExtractor.from_model(model, extractor.config, superglobal=modules)
    _assert_close(
        in_memory.raw(image)["global_descriptors"],
        extractor.raw(image)["global_descriptors"],
        "raw",
    )
    np.testing.assert_allclose(
        in_memory(image).global_descriptor, features.global_descriptor, atol=1e-6
    )
    np.testing.assert_array_equal(in_memory(image).locations, features.locations)
    # The DelfConfig route of `python -m delg_tf.extract --delf_config` reads it too.
    by_config = DelgExtractor.from_config(config_lib.config_asset_path(path), model_path=str(path))
    assert by_config.global_aggregation == "max"
    np.testing.assert_array_equal(by_config(image).global_descriptor, features.global_descriptor)


def test_folded_and_keras_exports_agree(model, exports, image):
    folded_default, folded_bytes = _serve(exports[ALL, True], image)
    keras_default, keras_bytes = _serve(exports[ALL, False], image)
    for key in folded_default:
        _assert_close(keras_default[key], folded_default[key], key, tol=1e-5)
    _assert_close(
        keras_bytes["global_descriptor"], folded_bytes["global_descriptor"], "final", 1e-5
    )
    raw, final = oracle_global(model, image, ALL)
    _assert_close(keras_default["global_descriptors"], raw, "keras raw")
    _assert_close(keras_bytes["global_descriptor"], final, "keras final")


_RELOAD_SCRIPT = BLOCK_DELG_TF_IMPORTS + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf

    export_dir, data_dir = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(export_dir)
    png = open(data_dir + "/image.png", "rb").read()
    out = loaded.signatures["serving_image_bytes"](image_bytes=tf.constant(png))
    np.save(data_dir + "/global.npy", out["global_descriptor"].numpy())
    assert "delg_tf" not in sys.modules
""")


def test_export_serves_without_delg_tf(model, exports, image, tmp_path):
    (tmp_path / "image.png").write_bytes(tf.io.encode_png(image).numpy())
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(exports[ALL, True]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = oracle_global(model, image, ALL)[1]
    _assert_close(np.load(tmp_path / "global.npy"), final, "served without delg_tf")


# ------------------------------------------------------------------ in-memory layouts


@pytest.mark.parametrize(
    "overrides",
    [dict(backbone_layout="slim"), dict(backbone_layout="keras", attention_use_bn=False)],
    ids=lambda o: o["backbone_layout"],
)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "keras"])
def test_in_memory_all_modules_in_every_layout(overrides, fold):
    model = _model(seed=1, **overrides)
    image = random_image(150, 130, seed=2)
    config = CONFIG.to_delf_config("")
    extractor = DelgExtractor.from_model(model, config, fold_batch_norm=fold, superglobal=ALL)
    raw, final = oracle_global(model, image, ALL)
    _assert_close(extractor.raw(image)["global_descriptors"], raw, "raw")
    _assert_close(extractor(image).global_descriptor, final, "final")
    plain = DelgExtractor.from_model(model, config, fold_batch_norm=fold)
    np.testing.assert_array_equal(extractor(image).descriptors, plain(image).descriptors)


def test_global_mode_and_small_images(model):
    """Global-only extraction (one backbone pass) and an image whose smallest global
    scale has a conv5 map too small for regional-GeM's reflection padding."""
    config = dataclasses.replace(CONFIG, mode="global", global_scales_ind=(0, 1, 2))
    extractor = DelgExtractor.from_model(model, config.to_delf_config(""), superglobal=ALL)
    image = random_image(96, 110, seed=4)  # conv5 2x2 at scale 0.5: identity there.
    raw, final = oracle_global(model, image, ALL, global_scales_ind=(0, 1, 2))
    _assert_close(extractor.raw(image)["global_descriptors"], raw, "raw")
    _assert_close(extractor(image).global_descriptor, final, "final")
