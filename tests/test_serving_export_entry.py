"""`python -m delg_tf.export` on a delg_tf.train-style logdir with the real DelgModel."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from delg_tf import export as export_entry
from delg_tf.configs import ConfigError
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import random_image
from delg_tf.models import registry
from delg_tf.models.delg import DelgModelConfig
from delg_tf.extraction.config import (
    ExportConfig,
    read_export_config,
    read_superglobal_asset,
)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    config = DelgModelConfig(num_classes=5, backbone="tiny", attention_hidden=16)
    model = registry.build_model("delg", config, load_imagenet=False)
    directory = tmp_path_factory.mktemp("logdir")
    tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), str(directory), 1, checkpoint_name="ckpt"
    ).save(1)
    (directory / "config.json").write_text(
        json.dumps({"train": {"model_family": "delg"}, "model": config.to_dict()})
    )
    return directory, model


def test_export_main_matches_the_trained_model(logdir, tmp_path):
    directory, model = logdir
    config = export_entry.ExportRunConfig(
        checkpoint_dir=str(directory),
        export_path=str(tmp_path / "export"),
        export=ExportConfig(image_scales=(0.5, 1.0), global_scales_ind=(1,), score_threshold=0.0),
    )
    path = export_entry.main(config)
    exported = DelgExtractor.from_saved_model(path)
    image = random_image(70, 90)
    got, want = exported(image), DelgExtractor.from_model(model, exported.config)(image)
    np.testing.assert_allclose(got.global_descriptor, want.global_descriptor, atol=1e-6)
    np.testing.assert_allclose(got.descriptors, want.descriptors, atol=1e-5)
    # Training-only weights (classifiers) are not exported.
    names = {v.name for v in tf.saved_model.load(str(path)).model_variables}
    assert not any("classifier" in n for n in names)
    # Batch norm is folded by default; --nofold_batch_norm exports the Keras layers.
    assert all(n.startswith("folded_delg/") for n in names)
    keras_path = export_entry.main(
        dataclasses.replace(config, export_path=str(tmp_path / "keras"), fold_batch_norm=False)
    )
    keras_names = {v.name for v in tf.saved_model.load(str(keras_path)).model_variables}
    assert any("moving_variance" in n for n in keras_names)
    unfolded = DelgExtractor.from_saved_model(keras_path)(image)
    np.testing.assert_allclose(unfolded.global_descriptor, got.global_descriptor, atol=1e-5)
    np.testing.assert_array_equal(unfolded.locations, got.locations)


def test_export_cli_flags_and_errors(logdir, tmp_path):
    directory, _ = logdir
    args = [
        sys.executable,
        "-m",
        "delg_tf.export",
        f"--checkpoint_dir={directory}",
        f"--export_path={tmp_path / 'g'}",
        "--noexport_local",
        "--image_scales=0.5,1",
        "--global_scales_ind=0,1",
        "--nowarmup",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mode global" in result.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    with pytest.raises(ValueError, match="config.json.*--checkpoint_dir"):
        export_entry.main(
            export_entry.ExportRunConfig(
                checkpoint_dir=str(tmp_path), export_path=str(tmp_path / "x"), export=ExportConfig()
            )
        )
    with pytest.raises(ConfigError, match="--nofold_batch_norm"):
        export_entry.ExportRunConfig(
            checkpoint_dir=str(directory),
            export_path="x",
            export=ExportConfig(),
            fold_batch_norm=False,
            compute_dtype="bfloat16",
        )


def _export_cli(checkpoint_dir, export_path, *flags):
    """`python -m delg_tf.export` of the run in `checkpoint_dir` at two scales, no warm-up."""
    args = [
        sys.executable,
        "-m",
        "delg_tf.export",
        f"--checkpoint_dir={checkpoint_dir}",
        f"--export_path={export_path}",
        "--image_scales=0.5,1",
        "--global_scales_ind=0,1",
        "--nowarmup",
        *flags,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_export_cli_superglobal_flag(logdir, tmp_path):
    directory, _ = logdir
    done = _export_cli(directory, tmp_path / "sg", "--superglobal=scale_gem,gem_plus")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "superglobal gem_plus,scale_gem" in done.stdout
    assert read_superglobal_asset(tmp_path / "sg") == ("gem_plus", "scale_gem")
    assert read_export_config(tmp_path / "sg").delf_global_config.image_scales_ind
    for flag, message in [
        ("--superglobal=gem_plus,rgem", "--superglobal must be a subset of gem_plus,"),
        ("--superglobal=all,gem_plus", "'all' already names every module"),
    ]:
        bad = _export_cli(directory, tmp_path / "bad", flag)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
        assert bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr
    local = _export_cli(directory, tmp_path / "bad", "--noexport_global", "--superglobal=all")
    assert local.returncode == 2 and "--noexport_global" in local.stderr, local.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
    assert "superglobal" in export_entry.DELG_ONLY_FLAGS
