"""TrainConfig, flag parsing of every configs/*.flags, flags.txt round trip, LR schedules."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from delg_tf.configs import ConfigError
from delg_tf.train import parse_flags
from delg_tf.training import config as config_lib
from delg_tf.training.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.flags")))
PAPER_CONFIGS = [os.path.join(REPO, "configs", name) for name in ("r50.flags", "r101.flags")]


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"r50.flags", "r101.flags", "demo.flags"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_validates(path):
    train_config, model_config = parse_flags(["train", f"--flagfile={path}"])
    assert train_config.validate() is train_config
    assert train_config.model_family in config_lib.MODEL_FAMILIES
    if hasattr(model_config, "validate"):
        model_config.validate()


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_configs_match_section_4_1(path):
    train_config, model = parse_flags(["train", f"--flagfile={path}"])
    assert (train_config.batch_size, train_config.image_size) == (16, 512)
    assert (train_config.optimizer, train_config.momentum) == ("sgd", 0.9)
    assert (train_config.lr_schedule, train_config.max_iters) == ("linear", 1_500_000)
    assert 3e-4 <= train_config.initial_lr <= 1e-2
    assert train_config.data_source == "gldv2" and train_config.train_file_pattern
    assert model.backbone == os.path.basename(path).split(".")[0]
    assert (model.backbone_layout, model.block3_stride) == ("slim", True)
    assert (model.gem_power, model.learn_gem_power) == (3.0, False)
    assert (model.embedding_dim, model.local_dim, model.attention_hidden) == (2048, 128, 512)
    assert (model.arcface_margin, model.reconstruction_weight, model.attention_weight) == (
        0.1,
        10.0,
        1.0,
    )
    assert model.stop_gradients and model.learn_arcface_scale


def test_command_line_overrides_flagfile():
    train_config, _ = parse_flags(
        [
            "train",
            f"--flagfile={PAPER_CONFIGS[0]}",
            "--train_file_pattern=/x/train-*",
            "--initial_lr=0.001",
        ]
    )
    assert train_config.train_file_pattern == "/x/train-*"
    assert train_config.initial_lr == 0.001


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--foo=1"], "foo"),
        (["--flagfile=/no/such.flags"], "/no/such.flags"),
        (["--logdir=x", "--strategy=nccl"], "--strategy"),
        (["--logdir=x", "--data_source=gldv2"], "--train_file_pattern"),
        (["--logdir=x", "--data_source=embedded", "--batch_size=0"], "--batch_size"),
        (["--logdir=x", "--data_source=embedded", "--backbone=r7"], "backbone"),
        (["--logdir=x", "--data_source=embedded", "--proxy_alpha=16"], "--proxy_alpha"),
        (
            ["--logdir=x", "--data_source=embedded", "--warmup_steps=10", "--max_iters=5"],
            "--warmup_steps",
        ),
    ],
)
def test_bad_flags_raise_one_line_config_error(argv, needle):
    with pytest.raises(ConfigError) as info:
        parse_flags(["train"] + argv)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_validate_names_flag_expected_and_received():
    with pytest.raises(ConfigError, match=r"--momentum must be a float in \[0, 1\); received 1.5"):
        TrainConfig(logdir="x", data_source="embedded", momentum=1.5).validate()


def test_flags_txt_round_trip(tmp_path):
    train_config, model_config = parse_flags(
        ["train", f"--flagfile={os.path.join(REPO, 'configs', 'demo.flags')}"]
    )
    record = config_lib.config_record(
        dataclasses.replace(train_config, num_classes=10),
        dataclasses.replace(model_config, num_classes=10),
    )
    path = tmp_path / "flags.txt"
    path.write_text(config_lib.flags_text(record))
    again_train, again_model = parse_flags(["train", f"--flagfile={path}"])
    assert again_train.to_dict() == record["train"]
    assert json.loads(json.dumps(dataclasses.asdict(again_model))) == record["model"]


def test_resume_rule_allows_bookkeeping_changes_only(tmp_path):
    from delg_tf.training.runs import check_resume_config, write_config_files

    base = TrainConfig(logdir=str(tmp_path), data_source="embedded", num_classes=4)
    model = {"backbone": "tiny", "num_classes": 4}
    write_config_files(tmp_path, {"train": base.to_dict(), "model": model})
    longer = dataclasses.replace(base, max_iters=base.max_iters + 10, log_interval=7)
    check_resume_config(tmp_path, {"train": longer.to_dict(), "model": model})
    other_lr = dataclasses.replace(base, initial_lr=0.5)
    with pytest.raises(ConfigError, match="--initial_lr: saved 0.01, received 0.5"):
        check_resume_config(tmp_path, {"train": other_lr.to_dict(), "model": model})
    with pytest.raises(ConfigError, match="flags.txt"):
        check_resume_config(
            tmp_path, {"train": base.to_dict(), "model": {**model, "backbone": "r50"}}
        )


def test_learning_rate_schedules():
    from delg_tf.training.optimization import WarmupDecaySchedule

    linear = WarmupDecaySchedule(0.01, 100)
    values = [float(linear(s)) for s in (0, 50, 100, 150)]
    np.testing.assert_allclose(values, [0.01, 0.005, 0.0, 0.0], atol=1e-9)
    warm = WarmupDecaySchedule(0.01, 110, warmup_steps=10, kind="cosine")
    np.testing.assert_allclose(
        [float(warm(s)) for s in (0, 5, 10, 60, 110)], [0.0, 0.005, 0.01, 0.005, 0.0], atol=1e-7
    )
    constant = WarmupDecaySchedule(0.01, 100, kind="constant")
    assert float(constant(99)) == pytest.approx(0.01)
    restored = WarmupDecaySchedule(**linear.get_config())
    assert float(restored(50)) == pytest.approx(0.005)


def test_demo_flags_train_on_the_first_landmarks_only():
    train_config, _ = parse_flags(
        ["train", f"--flagfile={os.path.join(REPO, 'configs', 'demo.flags')}"]
    )
    from delg_tf import demo

    assert train_config.data_source == "embedded"
    assert train_config.embedded_train_landmarks == demo.DEFAULT_TRAIN_LANDMARKS


@pytest.mark.parametrize(
    "argv",
    [
        ["--logdir=x", "--data_source=embedded", "--embedded_train_landmarks=-1"],
        [
            "--logdir=x",
            "--data_source=embedded",
            "--model_family=glocal",
            "--embedded_train_landmarks=5",
        ],
        ["--logdir=x", "--train_file_pattern=t-*", "--embedded_train_landmarks=5"],
    ],
)
def test_embedded_train_landmarks_is_checked(argv):
    with pytest.raises(ConfigError, match="--embedded_train_landmarks"):
        parse_flags(["train", *argv])


def test_landmark_subset_csv_keeps_lower_ids_only(tmp_path):
    from delg_tf.data.errors import DataError
    from delg_tf.training.data import write_landmark_subset_csv

    source = tmp_path / "train.csv"
    source.write_text("id,url,landmark_id\na,,0\nb,,3\nc,,1\nd,,2\n", encoding="utf-8")
    subset = tmp_path / "subset.csv"
    assert write_landmark_subset_csv(source, 2, subset) == 2
    assert subset.read_text(encoding="utf-8") == "id,url,landmark_id\na,,0\nc,,1\n"
    with pytest.raises(DataError, match="--embedded_train_landmarks=0"):
        write_landmark_subset_csv(source, 0, subset)


def test_resume_of_a_run_saved_before_a_new_field_uses_its_default():
    saved = TrainConfig(logdir="x", data_source="embedded").to_dict()
    del saved["embedded_train_landmarks"]  # config.json written before the field existed
    current = TrainConfig(logdir="x", data_source="embedded").to_dict()
    assert config_lib.resume_mismatches(config_lib.with_train_defaults(saved), current) == []
