"""Glocal end to end on the tiny embedded data: honest train split, export CLI, Recall@K.

One tiny training run (module fixture) is trained through `delg_tf.training.trainer`,
exported with `python -m delg_tf.export`, reloaded in a process that cannot import
delg_tf, and evaluated with `delg_tf.evaluation.glocal.evaluate_glocal`.
"""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from delg_tf import export as export_entry
from delg_tf.configs import ConfigError
from delg_tf.data import cub
from delg_tf.evaluation.glocal import embed_dataset, evaluate_glocal, load_glocal_run
from delg_tf.evaluation.recall_at_k import RECALL_KS, recall_at_k
from delg_tf.models.glocal import GlocalModelConfig
from delg_tf.training import data as training_data
from delg_tf.training import trainer
from no_delg_tf import BLOCK_DELG_TF_IMPORTS
from training_helpers import short_embedded_run

IMAGE_SIZE = 64
STEPS = 2
BATCH_SIZE = 8
PRESET = "tiny"
TINY_LANDMARKS = 4  # delg_tf.data.embedded.PRESETS["tiny"]["num_landmarks"]
SUBPROCESS_TIMEOUT = 300

_RELOAD_SCRIPT = BLOCK_DELG_TF_IMPORTS + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf

    export_dir, images_path, output_path = sys.argv[1:4]
    loaded = tf.saved_model.load(export_dir)
    images = tf.constant(np.load(images_path))
    out = loaded.signatures["serving_default"](images=images)["embedding"]
    np.save(output_path, out.numpy())
    assert "delg_tf" not in sys.modules
""")


def _config(tmp, family="glocal", **overrides):
    values = dict(
        model_family=family,
        embedded_preset=PRESET,
        batch_size=BATCH_SIZE,
        image_size=IMAGE_SIZE,
        validation_interval=STEPS,
        validation_steps=1,
    )
    values.update(overrides)
    return short_embedded_run(tmp / f"{family}_run", tmp / "data", STEPS, **values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glocal_e2e")
    config = _config(tmp)
    trainer.train(
        config, GlocalModelConfig(backbone="tiny", local_dim=16, embedding_dim=8, aux_epochs=1)
    )
    return config


def _landmarks_of(paths, data_dir):
    """landmark_id of each training-view path, from the embedded train.csv."""
    root = training_data.embedded_root(data_dir, PRESET)
    with open(root / "train" / "train.csv", encoding="utf-8", newline="") as f:
        by_id = {row["id"]: int(row["landmark_id"]) for row in csv.DictReader(f)}
    return {by_id[path.rsplit("/", 1)[-1][: -len(".jpg")]] for path in paths}


def test_glocal_embedded_training_excludes_the_test_classes(run, monkeypatch):
    splits = []
    original = cub.make_metric_dataset

    def spy(split, *args, **kwargs):
        splits.append(split)
        return original(split, *args, **kwargs)

    monkeypatch.setattr(cub, "make_metric_dataset", spy)
    data = training_data.make_train_data(run, seed=0)
    paths = training_data.embedded_metric_paths(run.data_dir, PRESET)
    train_split = cub.embedded_metric_split(paths, "train")
    test_split = cub.embedded_metric_split(paths, "test")
    assert set(train_split.class_ids).isdisjoint(test_split.class_ids)
    assert data.num_classes == len(train_split.class_ids) == TINY_LANDMARKS // 2
    used = [p for split in splits for p in split.paths]
    assert len(splits) == 2  # train + held-out validation, both of training landmarks.
    assert _landmarks_of(used, run.data_dir) == set(train_split.class_ids)
    assert sorted(used) == sorted(train_split.paths)  # No view lost, none duplicated.
    assert data.num_examples == len(splits[0])
    assert not set(splits[0].paths) & set(splits[1].paths)
    labels = np.concatenate([b[1].numpy() for b in data.train.take(3)])
    assert set(labels) <= set(range(data.num_classes))
    # The run's model has one proxy per training landmark.
    record = json.loads((training_data.Path(run.logdir) / "config.json").read_text())
    assert record["model"]["num_classes"] == TINY_LANDMARKS // 2


def test_delg_embedded_training_keeps_all_landmarks(run):
    data = training_data.make_train_data(
        _config(training_data.Path(run.data_dir).parent, family="delg"), seed=0
    )
    assert data.num_classes == TINY_LANDMARKS


def test_export_cli_reloads_without_the_package(run, tmp_path):
    export_dir = tmp_path / "export"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "delg_tf.export",
            f"--checkpoint_dir={run.logdir}",
            f"--export_path={export_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "glocal embedding" in result.stdout
    images = np.random.default_rng(0).uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 3))
    np.save(tmp_path / "images.npy", images.astype(np.float32))
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD_SCRIPT)
    reload = subprocess.run(
        [
            sys.executable,
            str(script),
            str(export_dir),
            str(tmp_path / "images.npy"),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert reload.returncode == 0, reload.stderr[-3000:]
    expected = load_glocal_run(run.logdir)(images.astype(np.float32), training=False).numpy()
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # The export remembers the run: evaluate_glocal finds the test data from it.
    from_export = evaluate_glocal(export_dir, "embedded", output_json=tmp_path / "export.json")
    from_run = evaluate_glocal(run.logdir, "embedded", output_json=tmp_path / "run.json")
    assert from_export["model_kind"] == "export" and from_run["model_kind"] == "run"
    for key, value in from_run["recall"].items():
        assert from_export["recall"][key] == pytest.approx(value)


def test_export_refuses_flags_of_the_other_family(run, tmp_path):
    with pytest.raises(ConfigError, match="--image_scales.*glocal"):
        export_entry.main(
            export_entry.ExportRunConfig(
                checkpoint_dir=run.logdir,
                export_path=str(tmp_path / "x"),
                export=None,
                delg_options=("image_scales",),
            )
        )
    assert not (tmp_path / "x").exists()


def test_evaluate_glocal_matches_recall_at_k(run, tmp_path):
    output = tmp_path / "results.json"
    results = evaluate_glocal(run.logdir, "embedded", batch_size=4, output_json=output)
    assert list(results["recall"]) == [f"R@{k}" for k in RECALL_KS]
    assert all(0.0 <= v <= 100.0 for v in results["recall"].values())
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    paths = training_data.embedded_metric_paths(run.data_dir, PRESET)
    test_split = cub.embedded_metric_split(paths, "test")
    assert results["num_images"] == len(test_split)
    assert results["num_classes"] == TINY_LANDMARKS - TINY_LANDMARKS // 2
    dataset = cub.make_metric_dataset(
        test_split,
        4,
        training=False,
        image_size=IMAGE_SIZE,
        resize_size=training_data.metric_resize_size(IMAGE_SIZE),
    )
    embeddings, labels = embed_dataset(load_glocal_run(run.logdir), dataset)
    expected = recall_at_k(embeddings, labels)
    for k in RECALL_KS:
        assert results["recall"][f"R@{k}"] == pytest.approx(100.0 * expected[k])


def test_evaluate_glocal_errors_name_the_fix(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="--model_path=.*config.json"):
        evaluate_glocal(tmp_path, "embedded")
    with pytest.raises(ValueError, match="dataset must be one of cub, embedded"):
        evaluate_glocal(run.logdir, "oxford")
    with pytest.raises(FileNotFoundError, match="ckpt-99.index"):
        evaluate_glocal(run.logdir, "embedded", checkpoint=f"{run.logdir}/ckpt-99")
    from delg_tf.data.errors import DataError

    with pytest.raises(DataError, match="--data_dir=.*download"):
        evaluate_glocal(run.logdir, "cub", data_dir=str(tmp_path / "missing"))


def test_evaluate_cli_reports_recall_for_glocal(run, tmp_path):
    output = tmp_path / "cli.json"
    base = [
        sys.executable,
        "-m",
        "delg_tf.evaluate",
        "--model_family=glocal",
        f"--model_path={run.logdir}",
        "--batch_size=4",
    ]
    done = subprocess.run(
        base + ["--dataset=embedded", f"--output_json={output}"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "R@1=" in done.stdout
    library = evaluate_glocal(
        run.logdir, "embedded", batch_size=4, output_json=tmp_path / "lib.json"
    )
    assert json.loads(output.read_text())["recall"] == library["recall"]
    wrong = subprocess.run(
        base + ["--dataset=roxford5k"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "--dataset must be one of ('cub', 'embedded')" in wrong.stderr
