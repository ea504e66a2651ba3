"""`python -m delg_tf.extract_beam`: the Beam pipeline vs `delg_tf.extract` on one folder.

Embedded photos (query/database views and the source photos, of several sizes) plus the
good/bad image corpus, the tiny model export of the extraction tests, two worker
processes (DirectRunner, multi_processing): the same store contents element-wise and the
same errors.tsv as `delg_tf.extract`; a rerun extracts nothing. Then the paths a
gs:// run takes (remote list file, shards uploaded under a temporary name, manifest), on
an in-memory Beam file system, in-process; and a complete shard that a failed run did
not list is taken as done.
"""

import dataclasses
import io
import json
import shutil
import subprocess
import sys

import apache_beam  # noqa: F401 - a requirement of `.[all]`: no importorskip
import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem

from delg_tf import extract
from delg_tf.data import embedded
from delg_tf.data.testing import write_bad_image_corpus
from delg_tf.extraction import beam as beam_lib
from delg_tf.extraction.config import ExportConfig
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn
from delg_tf.serving.delg_export import export_saved_model

CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=20,
    max_image_size=64,
    warmup=False,
)
IMAGES_PER_SHARD = 8
WORKERS = (
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
)
SUBPROCESS_TIMEOUT_S = 300
EXIT_USAGE, EXIT_RUN = 2, 3
MEMORY_SCHEME = "memtest"
NUM_MEMORY_IMAGES = 5


class _MemoryFile(io.BytesIO):
    """A file of `MemoryFileSystem`: its bytes are stored when it is closed."""

    def __init__(self, files, path):
        super().__init__()
        self._files, self._path = files, path

    def close(self):
        if not self.closed:
            self._files[self._path] = self.getvalue()
        super().close()


class MemoryFileSystem(FileSystem):
    """A Beam file system `memtest://` of objects in a dict, without folders (like
    gs://): registered by being defined; seen by the in-process runner only."""

    FILES = {}

    @classmethod
    def scheme(cls):
        return MEMORY_SCHEME

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for path, data in sorted(self.FILES.items()):
            if path.startswith(dir_or_prefix):
                yield FileMetadata(path, len(data))

    def create(self, path, mime_type=None, compression_type=None):
        return _MemoryFile(self.FILES, path)

    def open(self, path, mime_type=None, compression_type=None):
        return io.BytesIO(self.FILES[path])

    def copy(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            self.FILES[destination] = self.FILES[source]

    def rename(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            self.FILES[destination] = self.FILES.pop(source)

    def exists(self, path):
        return path in self.FILES

    def size(self, path):
        return len(self.FILES[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return str(hash(self.FILES[path]))

    def metadata(self, path):
        return FileMetadata(path, len(self.FILES[path]))

    def delete(self, paths):
        for path in paths:
            del self.FILES[path]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_saved_model(TinyDelgStandIn(), tmp_path_factory.mktemp("beam") / "export", CONFIG)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_images")
    paths = embedded.build_embedded_dataset(root / "embedded", preset="tiny")
    folder = root / "images"
    folder.mkdir()
    for photo in sorted(paths.jpg_dir.glob("*.jpg")) + sorted(paths.sources_dir.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    entries = write_bad_image_corpus(folder)
    return folder, {name: e.reason for name, e in entries.items() if not e.ok}


def _run_beam(*args):
    return subprocess.run(
        [sys.executable, "-m", "delg_tf.extract_beam", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_beam_pipeline_gives_the_store_and_error_log_of_extract(tmp_path, export_dir, images):
    folder, bad = images
    reference = extract.main(
        extract.ExtractConfig(
            output_dir=str(tmp_path / "reference"),
            images=str(folder),
            model_path=str(export_dir),
            progress=False,
        ),
        extractor=DelgExtractor.from_saved_model(str(export_dir)),
    )
    out = tmp_path / "beam"
    flags = [
        f"--images={folder}/*",
        f"--model_path={export_dir}",
        f"--output_dir={out}",
        f"--images_per_shard={IMAGES_PER_SHARD}",
        *WORKERS,
    ]
    result = _run_beam(*flags)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, store = FeatureStore(reference), FeatureStore(beam_lib.shard_files(out))
    assert len(store.files) > 1  # several shards, read as one store
    assert sorted(store.names) == sorted(expected.names)
    assert not set(bad) & set(store.names)
    bad = sorted(bad)
    for name in expected.names:
        want, got = expected.get(name), store.get(name)
        assert sorted(got) == sorted(want), name
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    # The same dead letters, in extract's format and order.
    logged = (out / beam_lib.ERROR_LOG_NAME).read_text(encoding="utf-8")
    assert logged == (tmp_path / "reference" / "errors.tsv").read_text(encoding="utf-8")
    assert sorted(line.split("\t")[0] for line in logged.splitlines()[1:]) == bad
    extracted = len(expected.names)
    assert (
        f"{extracted + len(bad)} images, {extracted} extracted, 0 already done, "
        f"{len(bad)} failed" in result.stdout
    )

    # A rerun (the folder this time) extracts nothing: same manifest and shards.
    manifest = json.loads((out / beam_lib.MANIFEST_NAME).read_text(encoding="utf-8"))
    assert sorted(n for names in manifest["shards"].values() for n in names) == sorted(
        expected.names
    )
    shards = sorted(p.name for p in (out / beam_lib.SHARDS_SUBDIR).iterdir())
    again = _run_beam(*[f"--images={folder}" if f.startswith("--images=") else f for f in flags])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 extracted, {extracted} already done, {len(bad)} failed" in again.stdout
    assert json.loads((out / beam_lib.MANIFEST_NAME).read_text(encoding="utf-8")) == manifest
    assert sorted(p.name for p in (out / beam_lib.SHARDS_SUBDIR).iterdir()) == shards
    assert (out / beam_lib.ERROR_LOG_NAME).read_text(encoding="utf-8") == logged


def test_only_bad_images_exit_with_one_error_line(tmp_path, export_dir, images):
    folder, bad = images
    bad = sorted(bad)
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("".join(f"{folder / name}\n" for name in bad), encoding="utf-8")
    out = tmp_path / "out"
    result = _run_beam(
        f"--images={only_bad}", f"--model_path={export_dir}", f"--output_dir={out}", *WORKERS
    )
    assert result.returncode == EXIT_RUN, result.stderr[-3000:]
    errors = _error_lines(result)
    assert len(errors) == 1 and f"all {len(bad)} of {len(bad)} images failed" in errors[0]
    assert "Traceback" not in result.stderr
    assert len((out / beam_lib.ERROR_LOG_NAME).read_text(encoding="utf-8").splitlines()) == (
        len(bad) + 1
    )
    assert not list((out / beam_lib.SHARDS_SUBDIR).glob("*.h5"))


def test_flags_neither_ours_nor_beams_are_refused(tmp_path, export_dir, images):
    folder, _ = images
    result = _run_beam(
        f"--images={folder}",
        f"--model_path={export_dir}",
        f"--output_dir={tmp_path / 'out'}",
        "--image_per_shard=4",
        *WORKERS,
    )
    assert result.returncode == EXIT_USAGE
    errors = _error_lines(result)
    assert len(errors) == 1 and "--image_per_shard" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_remote_file_system_paths_in_process(tmp_path, export_dir, images):
    folder, reasons = images
    good = [p for p in sorted(folder.iterdir()) if p.name not in reasons][:NUM_MEMORY_IMAGES]
    bad = sorted(reasons)
    files = MemoryFileSystem.FILES
    files.clear()
    root = f"{MEMORY_SCHEME}://bucket"
    for path in good + [folder / bad[0]]:
        files[f"{root}/img/{path.name}"] = path.read_bytes()
    lines = [f"img/{p.name}" for p in good] + [f"img/{bad[0]}", "img/missing.jpg"]
    files[f"{root}/list.txt"] = ("\n".join(lines) + "\n").encode("utf-8")
    for path in export_dir.rglob("*"):  # the SavedModel too: each worker copies it
        if path.is_file():
            files[f"{root}/model/{path.relative_to(export_dir).as_posix()}"] = path.read_bytes()
    config = beam_lib.BeamExtractConfig(
        output_dir=f"{root}/out",
        images=f"{root}/list.txt",
        model_path=f"{root}/model",
        images_per_shard=2,
        pipeline_args=("--runner=DirectRunner",),
    )
    beam_lib.run(config)
    shards = beam_lib.shard_files(config.output_dir)
    assert len(shards) == 3 and not [p for p in files if p.endswith(".tmp")]
    for k, shard in enumerate(shards):
        (tmp_path / f"{k}.h5").write_bytes(files[shard])
    store = FeatureStore([tmp_path / f"{k}.h5" for k in range(len(shards))])
    assert sorted(store.names) == lines[:NUM_MEMORY_IMAGES]
    extractor = DelgExtractor.from_saved_model(str(export_dir))
    want = extractor(str(good[0]))
    np.testing.assert_array_equal(store.get(lines[0])["global_descriptor"], want.global_descriptor)
    np.testing.assert_array_equal(store.get(lines[0])["descriptors"], want.descriptors)
    logged = files[config.error_log].decode("utf-8").splitlines()
    assert logged[0] == extract.ERROR_LOG_HEADER.strip()
    assert [line.split("\t")[:2] for line in logged[1:]] == [
        [lines[-2], reasons[bad[0]]],
        ["img/missing.jpg", "missing"],
    ]
    assert f"{root}/img/missing.jpg: no such file" in logged[2]


def test_complete_shard_missing_from_the_manifest_counts_as_done(tmp_path):
    config = beam_lib.BeamExtractConfig(
        output_dir=str(tmp_path), images=str(tmp_path), model_path="unused"
    )
    record = {
        "image_shape": (40, 50, 3),
        "global_descriptor": np.ones(4, np.float32),
        "locations": np.zeros((2, 2), np.float32),
        "descriptors": np.ones((2, 8), np.float32) / np.sqrt(8),
        "attention": np.ones(2, np.float32),
        "scales": np.ones(2, np.float32),
    }
    beam_lib.write_manifest([("shards/a-00000.h5", ["a.jpg"])], str(tmp_path), False, False)
    (tmp_path / "shards").mkdir()
    for shard, name in (("a-00000.h5", "a.jpg"), ("b-00000.h5", "b.jpg")):
        beam_lib.write_shard(str(tmp_path / "shards" / shard), [(name, record)])
    (tmp_path / "shards" / "b-00001.h5.tmp").write_bytes(b"half a shard")
    assert beam_lib.known_shards(config) == {
        "shards/a-00000.h5": ["a.jpg"],
        "shards/b-00000.h5": ["b.jpg"],
    }
    with pytest.raises(ValueError, match="--float16"):
        beam_lib.known_shards(dataclasses.replace(config, float16=True))
    beam_lib.remove_stale_temporaries(config.shards_dir)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["a-00000.h5", "b-00000.h5"]
