"""`extract --write_delf` keeps every per-image file inside `--output_dir/delf/`.

Image names come from the list file as written (absolute, `../`, unicode); they are
mapped to relative paths by `delf_io.relative_output_path`, and names whose files
would clash are refused before anything is written.
"""

import subprocess
import sys
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from delg_tf import extract
from delg_tf.configs import ConfigError
from delg_tf.extraction import delf_io
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig

CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=10,
    max_image_size=64,
)
IMAGE_SIDE = 48
EXIT_USAGE = 2
UNICODE_NAME = "sous-dossier/église_東京_😀.png"


@pytest.mark.parametrize(
    "name,expected",
    [
        ("a.jpg", "a.jpg"),
        ("sub/dir/a.jpg", "sub/dir/a.jpg"),
        ("/data/imgs/a.jpg", "data/imgs/a.jpg"),
        ("//server/share/a.jpg", "server/share/a.jpg"),
        ("C:\\imgs\\a.jpg", "imgs/a.jpg"),
        ("c:/imgs/a.jpg", "imgs/a.jpg"),
        ("../a.jpg", "a.jpg"),
        ("../../shared/x/a.jpg", "shared/x/a.jpg"),
        ("imgs/../a.jpg", "a.jpg"),
        ("imgs/./x/../../../a.jpg", "a.jpg"),
        ("./a//b.jpg", "a/b.jpg"),
        ("imgs\\sub/a.jpg", "imgs/sub/a.jpg"),
        (UNICODE_NAME, UNICODE_NAME),
        ("..a/b..jpg", "..a/b..jpg"),  # dots inside names are not segments
    ],
)
def test_relative_output_path_maps_names_inside_the_folder(name, expected):
    got = delf_io.relative_output_path(name)
    assert got == PurePosixPath(expected)
    assert not got.is_absolute() and ".." not in got.parts


@pytest.mark.parametrize("name", ["/", "..", "../..", "", "./", "a/..", "a\0b.jpg"])
def test_names_that_name_no_file_are_refused(name):
    with pytest.raises(ValueError, match="image name"):
        delf_io.relative_output_path(name)


@pytest.mark.parametrize(
    "names",
    [
        ["/data/a.jpg", "data/a.jpg"],
        ["../a.jpg", "a.jpg"],
        ["x/../a.jpg", "a.jpg"],
        ["A.jpg", "a.jpg"],  # one file on case-insensitive file systems
        [unicodedata.normalize("NFC", "é.jpg"), unicodedata.normalize("NFD", "é.jpg")],
        ["imgs\\a.jpg", "imgs/a.jpg"],
    ],
)
def test_names_mapped_to_the_same_file_are_refused(names):
    with pytest.raises(ValueError, match="would both be written to") as info:
        delf_io.official_file_bases(names)
    assert repr(names[0]) in str(info.value) and repr(names[1]) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_file_of_one_image_cannot_be_a_folder_of_another():
    with pytest.raises(ValueError, match="a folder of the files of image 'a.delf/b.jpg'"):
        delf_io.official_file_bases(["a", "a.delf/b.jpg"])
    bases = delf_io.official_file_bases(["a", "a/b.jpg", "b.jpg", "b.jpg.x/c.jpg"])
    assert bases["a/b.jpg"] == PurePosixPath("a/b.jpg")


@pytest.fixture(scope="module")
def extractor():
    return DelgExtractor.from_model(TinyDelgStandIn(), CONFIG.to_delf_config(""))


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=seed)).save(path)
    return path


def _files_under(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def test_list_with_absolute_parent_and_unicode_lines_writes_only_inside_output_dir(
    tmp_path, extractor
):
    elsewhere = _image(tmp_path / "elsewhere" / "abs.jpg", 0)  # an absolute line
    lists = tmp_path / "lists"
    _image(tmp_path / "above.jpg", 1)  # ../above.jpg
    _image(lists / UNICODE_NAME, 2)
    _image(lists / "plain.jpg", 3)
    lines = [str(elsewhere), "../above.jpg", UNICODE_NAME, "plain.jpg"]
    (lists / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = set(_files_under(tmp_path))
    out = tmp_path / "out"
    config = extract.ExtractConfig(
        output_dir=str(out),
        images=str(lists / "list.txt"),
        model_path="unused",
        write_delf=True,
        progress=False,
    )
    store = FeatureStore(extract.main(config, extractor=extractor))
    assert sorted(store.names) == sorted(lines)  # store names stay the list's lines
    created = set(_files_under(tmp_path)) - before
    assert created and all(out in p.parents for p in created), sorted(created)
    delf = out / "delf"
    expected = {
        elsewhere: delf / str(elsewhere).lstrip("/"),
        tmp_path / "above.jpg": delf / "above.jpg",
        lists / UNICODE_NAME: delf / UNICODE_NAME,
        lists / "plain.jpg": delf / "plain.jpg",
    }
    for name, (source, base) in zip(lines, expected.items()):
        record = store.get(name)
        global_file = base.with_name(base.name + delf_io.DELG_GLOBAL_EXTENSION)
        np.testing.assert_allclose(delf_io.read_datum(global_file), record["global_descriptor"])
        locations, _, descriptors, _, _ = delf_io.read_delf(
            base.with_name(base.name + delf_io.DELF_EXTENSION)
        )
        np.testing.assert_allclose(descriptors, record["descriptors"])
        assert not source.with_name(source.name + delf_io.DELG_GLOBAL_EXTENSION).exists()
    assert not (tmp_path / "out" / "above.jpg.delf").exists()  # nothing above delf/


def test_colliding_names_are_refused_before_anything_is_written(tmp_path, extractor):
    _image(tmp_path / "imgs" / "a.jpg", 0)
    (tmp_path / "imgs" / "sub").mkdir()
    (tmp_path / "imgs" / "list.txt").write_text(
        f"a.jpg\n{tmp_path / 'imgs' / 'a.jpg'}\nsub/../a.jpg\n"
    )
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "out"),
        images=str(tmp_path / "imgs" / "list.txt"),
        model_path="unused",
        write_delf=True,
        progress=False,
    )
    with pytest.raises(
        ConfigError, match="--write_delf: images 'a.jpg' and 'sub/../a.jpg' would both be written"
    ):
        extract.main(config, extractor=extractor)
    assert not (tmp_path / "out").exists()
    # Without --write_delf the names are only keys of the store: no clash.
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "out"),
        images=str(tmp_path / "imgs" / "list.txt"),
        model_path="unused",
        progress=False,
    )
    assert len(FeatureStore(extract.main(config, extractor=extractor))) == 3


def test_cli_refuses_a_collision_with_one_error_line(tmp_path):
    """Refused before the model is loaded (the model path does not even exist)."""
    _image(tmp_path / "a.jpg", 0)
    (tmp_path / "list.txt").write_text("a.jpg\nA.JPG\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "delg_tf.extract",
            f"--images={tmp_path / 'list.txt'}",
            f"--model_path={tmp_path / 'no_model'}",
            f"--output_dir={tmp_path / 'out'}",
            "--write_delf",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_USAGE, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "'a.jpg' and 'A.JPG' would both be written" in errors[0]
    assert "rename one of them" in errors[0]
    assert not (tmp_path / "out").exists()
