"""Official DELG models (TF1 tf-slim and TF2 exports): loading, conversion and parity.

Uses the parity fixtures in ../shared/parity (see its README.md and
tf1_slim/README.md): deterministic-weight official SavedModels regenerated in
seconds into a session tmp dir, and the official extractor's recorded outputs.
Mostly the 320 configs, to keep the runtime small.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delg_tf.official import selfcheck

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
TF1_DIR = PARITY_DIR / "tf1_slim"
pytestmark = pytest.mark.skipif(
    not PARITY_DIR.is_dir(),
    reason=f"parity fixtures not found at {PARITY_DIR} (expected ../shared/parity next to the "
    "repository); they hold the official-format DELG SavedModels and recorded outputs",
)

IMAGES = ("astronaut", "coffee", "chelsea", "motorcycle_left")
# Parity bounds of these tests (issue 12): about 5x the largest difference measured on the
# fixtures over every path below (official SavedModels through DelgExtractor; converted
# Keras model folded, unfolded and unrolled; converted export; the converter's own
# self-check), both formats, with oneDNN's native AVX-512 kernels and with
# ONEDNN_MAX_CPU_ISA=AVX2 (TF 2.21, x86-64). Measured maxima, native / AVX2:
#   global descriptor max abs   4.5e-8 / 3.7e-8 (raw TF1 rows 5.2e-8 / 6.3e-8) -> 3e-7
#   local descriptors max abs   5.7e-7 / 6.1e-7                                -> 3e-6
#   attention max abs           6.2e-6 / 4.5e-6 (TF1 scores 0.2-2.9)           -> 3e-5
# A wrong attention batch-norm epsilon (1e-5 instead of the TF2 head's 1e-3) moves the
# attention by 1.4e-4 and fails them. The converter's run-time self-check tolerances
# (selfcheck.*: 1e-4 global, 1e-3 descriptors / attention) stay looser on purpose (real
# models on other machines) and are not used here.
PARITY_GLOBAL_TOL = 3e-7
PARITY_DESCRIPTOR_TOL = 3e-6
PARITY_ATTENTION_TOL = 3e-5
LOCATION_TOL = selfcheck.LOCATION_TOLERANCE_PX
# compare_local counts a missing / extra feature only above threshold + margin (1e-4,
# READMEs); `_compare` then still requires every feature to match (no flips on these files).
THRESHOLD_MARGIN = selfcheck.BORDERLINE_SCORE_MARGIN
# Numbers every entry of the converter's self-check report (conversion.json) must carry.
SELF_CHECK_NUMBERS = (
    "global_max_abs",
    "descriptor_max_abs",
    "attention_max_abs",
    "location_max_abs",
    "num_reference",
    "num_candidate",
    "num_matched",
    "num_missing",
    "num_extra",
)


# ---------------------------------------------------------------- fixtures
def _regenerate(script, out, flag):
    subprocess.run(
        [sys.executable, str(script), str(out), flag],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="session")
def tf2_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("official") / "tf2"
    return _regenerate(PARITY_DIR / "make_official_savedmodel.py", out, "--force")


@pytest.fixture(scope="session")
def tf1_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("official") / "tf1"
    return _regenerate(
        TF1_DIR / "make_tf1_savedmodel.py", out, "--graph=" + str(TF1_DIR / "saved_model.pb")
    )


def _convert(model_dir, out):
    from delg_tf.official.convert import ConvertConfig, convert

    config = ConvertConfig(
        model_path=str(model_dir),
        output_dir=str(out),
        self_check_images=("chelsea",),
        verify_export=False,
    )
    lines = []
    convert(config, log=lines.append)
    return out, "\n".join(lines)


@pytest.fixture(scope="session")
def converted_tf2(tf2_model, tmp_path_factory):
    return _convert(tf2_model, tmp_path_factory.mktemp("converted") / "tf2")


@pytest.fixture(scope="session")
def converted_tf1(tf1_model, tmp_path_factory):
    return _convert(tf1_model, tmp_path_factory.mktemp("converted") / "tf1")


# ---------------------------------------------------------------- helpers
def _skimage(name):
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _config_path(fmt, size):
    if fmt == "tf2":
        return PARITY_DIR / "configs" / f"r50delg_gld_parity_{size}.pbtxt"
    name = "fast320" if size == 320 else "gld"
    return TF1_DIR / "configs" / f"r50delg_tf1sim_{name}_config.pbtxt"


def _expected(fmt, size, image):
    if fmt == "tf2":
        data = np.load(PARITY_DIR / "expected" / f"{size}_{image}.npz")
        keys = dict(
            locations="locations", descriptors="descriptors", scales="scales", attention="attention"
        )
    else:
        name = "fast320" if size == 320 else "gld"
        data = np.load(TF1_DIR / "expected" / f"r50delg_tf1sim_{name}_config__{image}.npz")
        keys = dict(
            locations="local_locations",
            descriptors="local_descriptors",
            scales="local_scales",
            attention="local_attention",
        )
    expected = {k: data[v] for k, v in keys.items()}
    expected["global_descriptor"] = data["global_descriptor"]
    return expected


def _threshold(fmt):
    from delg_tf.extraction.config import load_delf_config

    return load_delf_config(str(_config_path(fmt, 320))).delf_local_config.score_threshold


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compare(features, expected, threshold, label):
    """Element-wise parity within the PARITY_* bounds; local features matched by (location,
    scale). Prints and returns the measured numbers."""
    got = {
        "locations": features.locations,
        "scales": features.scales,
        "descriptors": features.descriptors,
        "attention": features.attention,
    }
    assert np.shape(features.global_descriptor) == expected["global_descriptor"].shape, label
    global_diff = float(
        np.abs(
            np.asarray(features.global_descriptor, np.float64) - expected["global_descriptor"]
        ).max()
    )
    local = selfcheck.compare_local(expected, got, abs_thres=threshold, margin=THRESHOLD_MARGIN)
    measured = dict(global_max_abs=global_diff, **local)
    print(
        f"parity {label}: global {global_diff:.2e}, descriptors "
        f"{local['descriptor_max_abs']:.2e}, attention {local['attention_max_abs']:.2e}, "
        f"location {local['location_max_abs']:.2e} px, matched "
        f"{local['num_matched']}/{local['num_reference']} (candidate {local['num_candidate']})"
    )
    assert all(_finite_number(v) for v in measured.values()), (label, measured)
    assert global_diff <= PARITY_GLOBAL_TOL, (
        f"{label}: global descriptor max abs {global_diff:.3g} > {PARITY_GLOBAL_TOL}"
    )
    # Every recorded feature found, nothing else kept (no borderline flips on these files).
    assert local["num_reference"] > 0, (label, local)
    assert local["num_matched"] == local["num_reference"] == local["num_candidate"], (label, local)
    assert local["descriptor_max_abs"] <= PARITY_DESCRIPTOR_TOL, (label, local)
    assert local["attention_max_abs"] <= PARITY_ATTENTION_TOL, (label, local)
    assert local["location_max_abs"] <= LOCATION_TOL, (label, local)
    return measured


def _assert_self_check_report(report, images):
    """The converter's self-check numbers (conversion.json) exist and are within the bounds.

    A missing entry, key or number (None, NaN) is an assertion failure, never a skip.
    """
    assert isinstance(report, list), f"self-check report is {report!r}, expected a list"
    assert [entry.get("image") for entry in report] == list(images), report
    for entry in report:
        name = entry.get("image")
        for key in SELF_CHECK_NUMBERS:
            assert key in entry, f"self-check report of {name} lacks {key!r}: {entry}"
            assert _finite_number(entry[key]), f"self-check {name}: {key} = {entry[key]!r}"
        print(
            f"parity self-check {name}: global {entry['global_max_abs']:.2e}, descriptors "
            f"{entry['descriptor_max_abs']:.2e}, attention {entry['attention_max_abs']:.2e}, "
            f"matched {entry['num_matched']}/{entry['num_reference']}"
        )
        assert entry.get("ok") is True, entry
        assert entry["num_missing"] == 0 and entry["num_extra"] == 0, entry
        assert entry["num_matched"] == entry["num_reference"] == entry["num_candidate"] > 0, entry
        assert entry["global_max_abs"] <= PARITY_GLOBAL_TOL, entry
        assert entry["descriptor_max_abs"] <= PARITY_DESCRIPTOR_TOL, entry
        assert entry["attention_max_abs"] <= PARITY_ATTENTION_TOL, entry
        assert entry["location_max_abs"] <= LOCATION_TOL, entry


def _config_for(fmt, size, model_path, tmp_path):
    text = _config_path(fmt, size).read_text().replace("MODEL_PATH", str(model_path))
    path = tmp_path / f"{fmt}_{size}.pbtxt"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- format and loading
def test_detect_format_from_the_model(tf1_model, tf2_model):
    from delg_tf.extraction.raw_model import detect_format

    assert detect_format(tf1_model) == "tf1"
    assert detect_format(tf2_model) == "tf2"


def test_tf1_loader_reproduces_the_recorded_raw_call(tf1_model):
    from delg_tf.extraction.raw_model import load_tf1_extraction_fn

    data = np.load(TF1_DIR / "expected" / "r50delg_tf1sim_fast320_config__chelsea.npz")
    fn = load_tf1_extraction_fn(tf1_model)
    out = fn(
        data["raw_input_image"],
        data["raw_input_scales"],
        data["raw_input_max_feature_num"],
        data["raw_input_abs_thres"],
        data["raw_input_global_scales_ind"],
    )
    assert out["global_descriptors"].shape == data["raw_global_descriptors"].shape
    raw_diff = float(np.abs(out["global_descriptors"] - data["raw_global_descriptors"]).max())
    print(f"parity official tf1 raw call chelsea: raw global rows {raw_diff:.2e}")
    assert raw_diff <= PARITY_GLOBAL_TOL
    assert out["boxes"].shape == data["raw_boxes"].shape


def test_tf1_loader_refuses_a_tf2_model(tf2_model):
    from delg_tf.extraction.raw_model import ModelFormatError, load_tf1_extraction_fn

    with pytest.raises(ModelFormatError, match="expected a TF1-format"):
        load_tf1_extraction_fn(tf2_model)


def test_tf2_variables_resolve_to_semantic_names(tf2_model):
    from delg_tf.official.variables import read_official_variables

    official = read_official_variables(tf2_model)
    assert len(official.tensors) == 332
    assert not [n for n in official.tensors if "/variables/" in n]
    manifest = json.loads((PARITY_DIR / "variables_manifest.json").read_text())
    semantic = {e["key"]: e["semantic"] for e in manifest["variables"] if e["semantic"]}
    for name, key in official.checkpoint_keys.items():
        assert name == "_model/" + semantic[key]


# ---------------------------------------------------------------- (1) official models as they are
@pytest.mark.parametrize("fmt", ["tf2", "tf1"])
def test_official_model_through_delg_extractor_matches_recorded(
    fmt, tf1_model, tf2_model, tmp_path
):
    from delg_tf.extraction.extractor import DelgExtractor

    model_dir = tf1_model if fmt == "tf1" else tf2_model
    extractor = DelgExtractor.from_config(_config_for(fmt, 320, model_dir, tmp_path))
    for image in IMAGES:
        _compare(
            extractor(_skimage(image)),
            _expected(fmt, 320, image),
            _threshold(fmt),
            f"official {fmt} 320 {image}",
        )
    # One image with the full-size (1024) config.
    extractor = DelgExtractor.from_config(_config_for(fmt, 1024, model_dir, tmp_path))
    _compare(
        extractor(_skimage("chelsea")),
        _expected(fmt, 1024, "chelsea"),
        _threshold(fmt),
        f"official {fmt} 1024 chelsea",
    )


# ---------------------------------------------------------------- (2) converted models
@pytest.mark.parametrize("fmt", ["tf2", "tf1"])
def test_converted_keras_model_matches_recorded(fmt, converted_tf1, converted_tf2, tmp_path):
    from delg_tf.extraction.config import load_delf_config
    from delg_tf.extraction.extractor import DelgExtractor
    from delg_tf.official.convert import load_converted_model

    out, log = converted_tf1 if fmt == "tf1" else converted_tf2
    assert "self-check [converted] chelsea" in log and "-> OK" in log
    model = load_converted_model(out)
    config = load_delf_config(str(_config_for(fmt, 320, "unused", tmp_path)))
    extractor = DelgExtractor.from_model(model, config)  # the folded graph (default)
    for image in IMAGES:
        _compare(
            extractor(_skimage(image)),
            _expected(fmt, 320, image),
            _threshold(fmt),
            f"converted {fmt} folded {image}",
        )


@pytest.mark.parametrize("fmt", ["tf2", "tf1"])
def test_converter_self_check_numbers_are_reported_and_tight(fmt, converted_tf1, converted_tf2):
    out, _ = converted_tf1 if fmt == "tf1" else converted_tf2
    conversion = json.loads((out / "conversion.json").read_text())
    assert "self_check" in conversion, sorted(conversion)
    _assert_self_check_report(conversion["self_check"], ("chelsea",))


def test_self_check_report_without_numbers_fails(converted_tf1):
    out, _ = converted_tf1
    entry = json.loads((out / "conversion.json").read_text())["self_check"][0]
    _assert_self_check_report([entry], ("chelsea",))
    for broken in (
        {k: v for k, v in entry.items() if k != "attention_max_abs"},
        {**entry, "global_max_abs": None},
        {**entry, "descriptor_max_abs": math.nan},
        {**entry, "num_matched": entry["num_matched"] - 1},
    ):
        with pytest.raises(AssertionError):
            _assert_self_check_report([broken], ("chelsea",))
    for report in (None, [], {"chelsea": entry}):
        with pytest.raises(AssertionError):
            _assert_self_check_report(report, ("chelsea",))


@pytest.mark.parametrize("fmt", ["tf2", "tf1"])
def test_folded_unfolded_and_unrolled_variants_match_recorded(
    fmt, converted_tf1, converted_tf2, tmp_path
):
    from delg_tf.extraction import raw_model
    from delg_tf.extraction.config import load_delf_config
    from delg_tf.extraction.extractor import DelgExtractor
    from delg_tf.official.convert import load_converted_model
    from delg_tf.extraction.folded import fold_delg_model
    from delg_tf.official.unrolled import UnrolledPyramid

    out, _ = converted_tf1 if fmt == "tf1" else converted_tf2
    model = load_converted_model(out)
    folded = fold_delg_model(model)
    config = load_delf_config(str(_config_for(fmt, 320, "unused", tmp_path)))
    unrolled = UnrolledPyramid(folded)

    def call(**kw):
        return unrolled(
            kw["input_image"],
            kw["input_scales"],
            kw["input_max_feature_num"],
            kw["input_abs_thres"],
            kw["input_global_scales_ind"],
        )

    variants = {
        "unfolded keras": DelgExtractor.from_model(model, config, fold_batch_norm=False),
        "folded": DelgExtractor.from_model(folded, config),
        "unrolled folded": DelgExtractor(raw_model.from_function(call), config),
    }
    for name, extractor in variants.items():
        _compare(
            extractor(_skimage("coffee")),
            _expected(fmt, 320, "coffee"),
            _threshold(fmt),
            f"converted {fmt} {name} coffee",
        )


@pytest.mark.parametrize("fmt", ["tf2", "tf1"])
def test_converted_export_matches_recorded(fmt, converted_tf1, converted_tf2, tmp_path):
    from delg_tf.extraction.extractor import DelgExtractor

    out, _ = converted_tf1 if fmt == "tf1" else converted_tf2
    config = _config_for(fmt, 320, out / "saved_model", tmp_path)
    extractor = DelgExtractor.from_config(config)
    for image in ("chelsea", "motorcycle_left"):
        _compare(
            extractor(_skimage(image)),
            _expected(fmt, 320, image),
            _threshold(fmt),
            f"converted {fmt} export {image}",
        )


def test_converted_checkpoint_restores_into_a_training_model(converted_tf1):
    import tensorflow as tf
    from delg_tf.models.delg import DelgModel, DelgModelConfig
    from delg_tf.official.convert import load_converted_model
    from delg_tf.official.mapping import relative_path

    out, _ = converted_tf1
    model_config = json.loads((out / "model_config.json").read_text())
    model_config["num_classes"] = 7
    model = DelgModel(DelgModelConfig.from_dict(model_config))
    model.build()
    path = tf.train.latest_checkpoint(str(out / "checkpoint"))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    converted = load_converted_model(out)
    by_path = {relative_path(model, v): v for v in model.variables}
    compared = 0
    for variable in converted.variables:
        np.testing.assert_array_equal(
            by_path[relative_path(converted, variable)].numpy(), variable.numpy()
        )
        compared += 1
    # Backbone blocks included (Keras 3 lists are not checkpointed by themselves).
    assert compared == len(converted.variables) > 270
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["source_format"] == "tf1"
    assert conversion["numerics"]["backbone_layout"] == "slim"


# ---------------------------------------------------------------- (3) refusal
def test_altered_head_shape_is_refused_and_nothing_written(tf1_model, tmp_path):
    import tensorflow as tf
    from delg_tf.official.convert import ConvertConfig, convert
    from delg_tf.official.mapping import MappingError

    altered = tmp_path / "altered"
    (altered / "variables").mkdir(parents=True)
    shutil.copyfile(tf1_model / "saved_model.pb", altered / "saved_model.pb")
    reader = tf.train.load_checkpoint(str(tf1_model / "variables" / "variables"))
    names = sorted(reader.get_variable_to_shape_map())
    bad = "autoencoder/encoder/weights"
    tensors = [
        reader.get_tensor(n) if n != bad else np.zeros([1, 1, 1024, 64], np.float32) for n in names
    ]
    tf.raw_ops.SaveV2(
        prefix=str(altered / "variables" / "variables"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=tensors,
    )
    out = tmp_path / "out"
    config = ConvertConfig(model_path=str(altered), output_dir=str(out))
    with pytest.raises(MappingError) as error:
        convert(config, log=lambda line: None)
    message = str(error.value)
    assert bad in message and "[1, 1, 1024, 64]" in message and "[1, 1, 1024, 128]" in message
    assert "nothing was written" in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
