"""Name mapping of official DELG variables (tf-slim / TF2 Keras) onto DelgModel, from manifests."""

import json
from pathlib import Path

import numpy as np
import pytest

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
pytestmark = pytest.mark.skipif(
    not PARITY_DIR.is_dir(),
    reason=f"parity fixtures not found at {PARITY_DIR} (expected ../shared/parity next to the "
    "repository); their manifests list the official variable names and shapes",
)


def _sources(manifest_path, key_field="key", name_fn=lambda entry: entry["key"]):
    manifest = json.loads(Path(manifest_path).read_text())
    return {
        name_fn(e): np.zeros(e["shape"], np.float32)
        for e in manifest["variables"]
        if e.get("dtype", "float32") == "float32"
    }


def _targets(fmt, backbone):
    from delg_tf.official import convert, mapping

    model = convert.build_converted_model(convert.official_model_config(fmt, backbone))
    return mapping.model_targets(model)


@pytest.fixture(scope="module")
def r50_slim_targets():
    return _targets("tf1", "r50")


def test_tf1_r50_names_map_one_to_one(r50_slim_targets):
    from delg_tf.official import mapping

    sources = _sources(PARITY_DIR / "tf1_slim" / "variables_manifest_r50.json")
    result = mapping.map_official_variables(sources, "tf1", r50_slim_targets)
    assert len(result.assignments) == len(sources) == 278
    assert {how for _, how in result.assignments.values()} == {"name"}
    assert result.assignments["resnet/conv4_block6/2/conv/kernel"][0] == (
        "resnet_v1_50/block3/unit_6/bottleneck_v1/conv2/weights"
    )
    assert result.assignments["attention/bn_conv1/moving_variance"][0] == (
        "attention_block/attention/compute/conv1/BatchNorm/moving_variance"
    )
    assert mapping.infer_depth(sources, "tf1") == 50


def test_tf1_r101_names_map_one_to_one():
    from delg_tf.official import mapping

    sources = _sources(PARITY_DIR / "tf1_slim" / "variables_manifest_r101.json")
    result = mapping.map_official_variables(sources, "tf1", _targets("tf1", "r101"))
    assert len(result.assignments) == len(sources) == 533
    assert mapping.infer_depth(sources, "tf1") == 101


def test_tf2_semantic_names_map_one_to_one():
    from delg_tf.official import mapping

    sources = _sources(
        PARITY_DIR / "variables_manifest.json",
        name_fn=lambda e: "_model/" + (e["semantic"] or e["key"]),
    )
    result = mapping.map_official_variables(sources, "tf2", _targets("tf2", "r50"))
    assert len(result.assignments) == len(sources) == 332
    assert result.assignments["whitening/kernel"][0] == "_model/backbone/embedding_layer/kernel"
    assert result.assignments["resnet/conv4_block1/0/conv/bias"][0] == (
        "_model/backbone/l4a/conv_shortcut/bias"
    )


def test_unknown_head_scopes_are_assigned_by_role_and_shape(r50_slim_targets):
    from delg_tf.official import mapping

    renames = {
        "attention_block/attention/compute/conv1": "delg/attn/hidden",
        "attention_block/attention/compute/conv2": "delg/attn/score",
        "autoencoder/encoder": "delg/reduce",
        "autoencoder/decoder": "delg/expand",
        "whitening": "delg/embedding",
    }

    def rename(name):
        for old, new in renames.items():
            if name.startswith(old + "/"):
                return new + name[len(old) :]
        return name

    sources = {
        rename(k): v
        for k, v in _sources(PARITY_DIR / "tf1_slim" / "variables_manifest_r50.json").items()
    }
    sources["global_step"] = np.zeros([], np.float32)
    sources["delg/cosine_weights"] = np.zeros([2048, 10], np.float32)
    result = mapping.map_official_variables(sources, "tf1", r50_slim_targets)
    assert result.assignments["attention/conv1/kernel"] == (
        "delg/attn/hidden/weights",
        "role+shape",
    )
    assert result.assignments["attention/bn_conv1/gamma"][0] == "delg/attn/hidden/BatchNorm/gamma"
    assert result.assignments["autoencoder/conv2/bias"][0] == "delg/expand/biases"
    assert result.assignments["whitening/kernel"][0] == "delg/embedding/weights"
    assert sorted(result.ignored) == ["delg/cosine_weights", "global_step"]
    assert "by role+shape" in result.describe(sources)


def test_unmatched_and_missing_variables_are_listed(r50_slim_targets):
    from delg_tf.official import mapping

    sources = _sources(PARITY_DIR / "tf1_slim" / "variables_manifest_r50.json")
    del sources["resnet_v1_50/block2/unit_1/bottleneck_v1/conv1/weights"]
    sources["some_new_layer/weights"] = np.zeros([3, 3, 7, 7], np.float32)
    with pytest.raises(mapping.MappingError) as error:
        mapping.map_official_variables(sources, "tf1", r50_slim_targets)
    message = str(error.value)
    assert "unmatched official variable: some_new_layer/weights [3, 3, 7, 7]" in message
    assert "left unfilled: resnet/conv3_block1/1/conv/kernel [1, 1, 256, 128]" in message
