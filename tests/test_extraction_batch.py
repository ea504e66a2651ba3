"""Batch extraction: bad-input corpus, error log, resume, shards, official files, CLI."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from delg_tf import extract
from delg_tf.data.testing import write_bad_image_corpus
from delg_tf.extraction import delf_io
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig
from delg_tf.serving.delg_export import export_saved_model

CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=20,
    max_image_size=64,
)


@pytest.fixture(scope="module")
def model():
    return TinyDelgStandIn()


@pytest.fixture(scope="module")
def extractor(model):
    return DelgExtractor.from_model(model, CONFIG.to_delf_config(""))


def test_bad_corpus_is_reported_and_resume_skips_done(tmp_path, extractor, capsys):
    entries = write_bad_image_corpus(tmp_path / "images")
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "out"),
        images=str(tmp_path / "images"),
        model_path="unused",
        write_delf=True,
        binarize=True,
        flush_every=3,
        progress=False,
    )
    store_path = extract.main(config, extractor=extractor)
    good = sorted(name for name, e in entries.items() if e.ok)
    bad = {name: e.reason for name, e in entries.items() if not e.ok}
    store = FeatureStore(store_path)
    assert sorted(store.names) == good
    lines = (tmp_path / "out" / "errors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    logged = {line.split("\t")[0]: line.split("\t")[1] for line in lines}
    assert logged == bad
    printed = capsys.readouterr().out
    assert f"{len(good)} extracted, 0 already done, {len(bad)} failed" in printed
    # Official per-image files for interop.
    name = "good_rgb.jpg"
    locations, scales, descriptors, attention, _ = delf_io.read_delf(
        tmp_path / "out" / "delf" / (name + ".delf")
    )
    record = store.get(name)
    np.testing.assert_allclose(locations, record["locations"])
    np.testing.assert_allclose(descriptors, record["descriptors"])
    np.testing.assert_allclose(
        delf_io.read_datum(tmp_path / "out" / "delf" / (name + ".delg_global")),
        record["global_descriptor"],
    )
    # Resume: nothing left to extract, same store content.
    before = store.arrays()
    extract.main(config, extractor=extractor)
    assert "0 extracted, %d already done" % len(good) in capsys.readouterr().out
    after = FeatureStore(store_path).arrays()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_shards_partition_a_list_file(tmp_path, extractor):
    names = [f"sub/im{i}.png" for i in range(5)]
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(random_image(40, 50, seed=i)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    seen = []
    for shard in range(2):
        config = extract.ExtractConfig(
            output_dir=str(tmp_path / "out"),
            images=str(tmp_path / "list.txt"),
            model_path="unused",
            shard_index=shard,
            num_shards=2,
            progress=False,
        )
        path = extract.main(config, extractor=extractor)
        assert path.name == f"features-{shard:05d}-of-00002.h5"
        seen += FeatureStore(path).names
    assert sorted(seen) == sorted(names)
    with pytest.raises(ValueError, match="shard_index"):
        extract.ExtractConfig(output_dir="x", model_path="m", shard_index=2, num_shards=2)


def test_cli_with_an_export(tmp_path, model):
    export = export_saved_model(model, tmp_path / "export", CONFIG)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(random_image(50, 70, seed=i)).save(tmp_path / "images" / f"{i}.jpg")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "delg_tf.extract",
            f"--images={tmp_path / 'images'}",
            f"--model_path={export}",
            f"--output_dir={tmp_path / 'out'}",
            "--float16",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 extracted" in result.stdout
    store = FeatureStore(tmp_path / "out" / "features.h5")
    assert store.arrays()["descriptors"].dtype == np.float16
    missing = subprocess.run(
        [sys.executable, "-m", "delg_tf.extract", "--images=x", f"--output_dir={tmp_path / 'o2'}"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "--delf_config" in missing.stderr
