"""SavedModel export: official signature, loading without delg_tf, overwrite rules, warm-up."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.extraction import config as extraction_config
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.serving import delg_export, warmup

PARITY_SAVED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "parity" / "saved_model.pb"
SCALES = (0.5, 1.0, 1.4142135)
CONFIG = delg_export.ExportConfig(
    image_scales=SCALES,
    global_scales_ind=(0, 2),
    max_feature_num=40,
    score_threshold=0.5,
    max_image_size=-1,
)
SUBPROCESS_TIMEOUT_S = 240

# Runs in a fresh interpreter where `import delg_tf` must fail (blocked before use).
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["delg_tf"] = None  # any import of delg_tf now raises ImportError
    try:
        import delg_tf  # noqa: F401
        raise SystemExit("delg_tf is importable: the check would prove nothing")
    except ImportError:
        pass
    import numpy as np
    import tensorflow as tf
    export, inputs_npz, out_npz = sys.argv[1:4]
    loaded = tf.saved_model.load(export)
    inputs = dict(np.load(inputs_npz))
    default = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items() if k.startswith("input_")})
    by_bytes = loaded.signatures["serving_image_bytes"](
        image_bytes=tf.constant(inputs["png"].tobytes()))
    arrays = {"default_" + k: v.numpy() for k, v in default.items()}
    arrays.update({"bytes_" + k: v.numpy() for k, v in by_bytes.items()})
    np.savez(out_npz, **arrays)
    print(json.dumps({"modules": sorted(m for m, module in sys.modules.items()
                                        if m.startswith("delg") and module is not None)}))
""")


@pytest.fixture(scope="module")
def model():
    return TinyDelgStandIn()


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    return delg_export.export_saved_model(model, tmp_path_factory.mktemp("exp") / "delg", CONFIG)


def _signature_def(saved_model_dir, name="serving_default"):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    signature = proto.meta_graphs[0].signature_def[name]

    def spec(infos):
        return {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in infos.items()}

    return spec(signature.inputs), spec(signature.outputs), signature.method_name


def test_serving_default_has_the_official_input_and_output_names(export_dir):
    ours = _signature_def(export_dir)
    assert set(ours[0]) == {
        "input_image",
        "input_scales",
        "input_max_feature_num",
        "input_abs_thres",
        "input_global_scales_ind",
    }
    assert set(ours[1]) == {"boxes", "features", "scales", "scores", "global_descriptors"}


@pytest.mark.skipif(
    not PARITY_SAVED_MODEL.exists(),
    reason=f"{PARITY_SAVED_MODEL} absent: no official export to compare with",
)
def test_serving_default_is_identical_to_the_official_signature(export_dir):
    assert _signature_def(export_dir) == _signature_def(PARITY_SAVED_MODEL.parent)


def test_export_loads_without_delg_tf_and_matches_in_memory(model, export_dir, tmp_path):
    image = random_image(72, 88, seed=7)
    png = tf.io.encode_png(image).numpy()
    inputs = {
        "input_image": image,
        "input_scales": np.float32(SCALES),
        "input_max_feature_num": np.int32(CONFIG.max_feature_num),
        "input_abs_thres": np.float32(CONFIG.score_threshold),
        "input_global_scales_ind": np.int32(CONFIG.global_scales_ind),
        "png": np.frombuffer(png, np.uint8),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "load_export.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(export_dir),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["modules"] == []
    out = dict(np.load(tmp_path / "out.npz"))

    in_memory = DelgExtractor.from_model(model, CONFIG.to_delf_config(""))
    raw = in_memory.raw(image)
    for key, value in raw.items():
        np.testing.assert_allclose(out["default_" + key], value, rtol=1e-5, atol=1e-5)
    features = in_memory(image)
    np.testing.assert_allclose(
        out["bytes_global_descriptor"], features.global_descriptor, atol=1e-6
    )
    np.testing.assert_allclose(out["bytes_locations"], features.locations, atol=1e-3)
    np.testing.assert_allclose(out["bytes_descriptors"], features.descriptors, atol=1e-5)
    np.testing.assert_allclose(out["bytes_attention"], features.attention, atol=1e-5)
    np.testing.assert_allclose(out["bytes_scales"], features.scales)


def test_overwrite_rules_and_no_leftovers(model, export_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        delg_export.export_saved_model(model, export_dir, CONFIG)
    config = delg_export.ExportConfig(
        mode="global", image_scales=SCALES, global_scales_ind=(1,), warmup=False
    )
    delg_export.export_saved_model(model, export_dir.parent / "global", config)
    assert sorted(p.name for p in export_dir.parent.iterdir()) == ["delg", "global"]
    inputs, outputs, _ = _signature_def(export_dir.parent / "global")
    assert set(inputs) == {"input_image", "input_scales", "input_global_scales_ind"}
    assert set(outputs) == {"global_descriptors"}


def test_local_only_variant_and_overwrite(model, tmp_path):
    config = delg_export.ExportConfig(mode="local", image_scales=SCALES, score_threshold=0.0)
    path = delg_export.export_saved_model(model, tmp_path / "local", config)
    (path / "marker").write_text("old")
    delg_export.export_saved_model(model, path, config, overwrite=True)
    assert not (path / "marker").exists()
    inputs, outputs, _ = _signature_def(path)
    assert set(inputs) == {
        "input_image",
        "input_scales",
        "input_max_feature_num",
        "input_abs_thres",
    }
    assert set(outputs) == {"boxes", "features", "scales", "scores"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]
    features = DelgExtractor.from_saved_model(path)(random_image(50, 60))
    assert features.global_descriptor.size == 0 and features.descriptors.shape[1] == 128


def test_warmup_records_and_baked_config(export_dir):
    records = list(
        tf.data.TFRecordDataset(
            str(export_dir / warmup.WARMUP_DIR / warmup.WARMUP_FILE)
        ).as_numpy_iterator()
    )
    decoded = [warmup.decode_prediction_log(r) for r in records]
    assert [d[0] for d in decoded] == [
        delg_export.SIGNATURE_DEFAULT,
        delg_export.SIGNATURE_IMAGE_BYTES,
    ]
    assert decoded[0][1]["input_image"].dtype == np.uint8
    np.testing.assert_allclose(decoded[0][1]["input_scales"], SCALES)
    config = extraction_config.read_export_config(export_dir)
    assert list(config.delf_global_config.image_scales_ind) == [0, 2]
    assert config.delf_local_config.max_feature_num == CONFIG.max_feature_num


def test_wrong_dtype_and_rank_give_clear_errors(export_dir):
    extractor = DelgExtractor.from_saved_model(export_dir)
    with pytest.raises(TypeError, match="uint8"):
        extractor(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        extractor(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        extractor.raw_fn(np.zeros((32, 32, 3), np.int32), SCALES, 10, 0.0, [0])
    with pytest.raises(ValueError, match="outside"):
        extractor.raw_fn(np.zeros((32, 32, 3), np.uint8), SCALES, 10, 0.0, [5])
    # The signature itself also refuses a wrong dtype.
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        signature(
            input_image=tf.zeros((32, 32, 3), tf.float32),
            input_scales=tf.constant([1.0]),
            input_max_feature_num=tf.constant(5),
            input_abs_thres=tf.constant(0.0),
            input_global_scales_ind=tf.constant([0]),
        )


def test_image_bytes_signature_resizes_like_the_host(model, tmp_path):
    config = delg_export.ExportConfig(
        image_scales=SCALES,
        global_scales_ind=(1,),
        max_feature_num=10**5,
        score_threshold=0.0,
        max_image_size=64,
        warmup=False,
    )
    path = delg_export.export_saved_model(model, tmp_path / "resizing", config)
    image = random_image(90, 120, seed=11)
    served = tf.saved_model.load(str(path)).signatures["serving_image_bytes"](
        image_bytes=tf.io.encode_png(image)
    )
    host = DelgExtractor.from_saved_model(path)(image)  # Pillow resize on the host
    assert host.scale_factors.tolist() == [48 / 90, 64 / 120]

    def keyed(locations, scales):
        return sorted(
            zip(np.round(locations[:, 0], 3), np.round(locations[:, 1], 3), np.round(scales, 5))
        )

    # Every cell kept: same keypoints (same sizes and scale factors as the official rule).
    assert keyed(served["locations"].numpy(), served["scales"].numpy()) == keyed(
        host.locations, host.scales
    )
    cosine = float(np.dot(served["global_descriptor"].numpy(), host.global_descriptor))
    assert cosine > 0.99  # pixels differ by <= 1 grey level (TF vs Pillow antialiasing)


def test_warmup_records_parse_with_tensorflow_serving_protos(export_dir):
    """TF Serving reads the warm-up file as PredictionLog protos: check with its own stubs."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = str(export_dir / warmup.WARMUP_DIR / warmup.WARMUP_FILE)
    logs = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record)
        logs.append(log)
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
        delg_export.SIGNATURE_DEFAULT,
        delg_export.SIGNATURE_IMAGE_BYTES,
    ]
    default_inputs = logs[0].predict_log.request.inputs
    assert set(default_inputs) == {
        "input_image",
        "input_scales",
        "input_max_feature_num",
        "input_abs_thres",
        "input_global_scales_ind",
    }
    np.testing.assert_allclose(tf.make_ndarray(default_inputs["input_scales"]), SCALES)
    assert tf.make_ndarray(default_inputs["input_image"]).dtype == np.uint8
    image_bytes = tf.make_ndarray(logs[1].predict_log.request.inputs["image_bytes"])
    assert tf.io.decode_image(image_bytes.item()).shape[-1] == 3


def test_saved_model_cli_lists_the_named_signatures(export_dir):
    """`saved_model_cli show` (what TF Serving users run first) lists both signatures."""
    cli = Path(sys.executable).with_name("saved_model_cli")
    done = subprocess.run(
        [str(cli), "show", "--dir", str(export_dir), "--tag_set", "serve"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split('"')[1] for line in done.stdout.splitlines() if "SignatureDef key" in line}
    assert {delg_export.SIGNATURE_DEFAULT, delg_export.SIGNATURE_IMAGE_BYTES} <= listed
