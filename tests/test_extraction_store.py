"""Feature store (crash injection + resume), DELG* binarisation, .delf / datum round trips."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from delg_tf.extraction import binarize, delf_io
from delg_tf.extraction.store import FeatureStore, FeatureStoreWriter, consolidate

NUM_IMAGES = 7
LOCAL_DIM = 128
GLOBAL_DIM = 16


def _records(seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for k in range(NUM_IMAGES):
        n = int(rng.integers(0, 9))
        records.append(
            (
                f"dir/img_{k:02d}.jpg",
                {
                    "image_shape": (30 + k, 40, 3),
                    "global_descriptor": rng.normal(size=GLOBAL_DIM).astype(np.float32),
                    "locations": rng.uniform(0, 40, (n, 2)).astype(np.float32),
                    "descriptors": rng.normal(size=(n, LOCAL_DIM)).astype(np.float32),
                    "attention": rng.uniform(0, 2, n).astype(np.float32),
                    "scales": rng.choice([0.5, 1.0, 2.0], n).astype(np.float32),
                },
            )
        )
    return records


def _write_all(directory, records, **kwargs):
    with FeatureStoreWriter(directory, flush_every=2, **kwargs) as writer:
        for name, features in records:
            if name not in writer.done:
                writer.add(name, features)


def _assert_same_content(path_a, path_b):
    a, b = FeatureStore(path_a).arrays(), FeatureStore(path_b).arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# A writer process killed (SIGKILL) in the middle of writing its 3rd part file.
CRASHING_WRITER = textwrap.dedent("""
    import os, pickle, signal, sys
    import h5py
    from delg_tf.extraction.store import FeatureStoreWriter
    records = pickle.load(open(sys.argv[2], "rb"))
    calls = {"n": 0}
    original = h5py.Group.create_dataset
    def create_dataset(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    h5py.Group.create_dataset = create_dataset
    writer = FeatureStoreWriter(sys.argv[1], flush_every=2)
    for name, features in records:
        writer.add(name, features)
    writer.close()
""")
DATASETS_PER_PART = 8


def test_resume_after_kill_gives_identical_store(tmp_path):
    import pickle

    records = _records()
    _write_all(tmp_path / "clean.parts", records)
    clean = consolidate(
        tmp_path / "clean.parts", tmp_path / "clean.h5", order=[n for n, _ in records]
    )

    (tmp_path / "records.pkl").write_bytes(pickle.dumps(records))
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_WRITER)
    kill_at = 2 * DATASETS_PER_PART + 3  # inside the 3rd part
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "crashed.parts"),
            str(tmp_path / "records.pkl"),
            str(kill_at),
        ],
        capture_output=True,
    )
    assert result.returncode != 0  # killed
    leftovers = sorted(p.name for p in (tmp_path / "crashed.parts").iterdir())
    # Two complete parts and the temporary file of the third (`.part-000002.h5.<r>.tmp`).
    assert [n for n in leftovers if not n.endswith(".tmp")] == ["part-000000.h5", "part-000001.h5"]
    assert [n.split(".")[1] for n in leftovers if n.endswith(".tmp")] == ["part-000002"]
    # Readers see only complete records.
    assert len(FeatureStore(tmp_path / "crashed.parts")) == 4

    _write_all(tmp_path / "crashed.parts", records)  # resume: skips the 4 finished images
    assert not list((tmp_path / "crashed.parts").glob("*.tmp"))
    resumed = consolidate(
        tmp_path / "crashed.parts", tmp_path / "resumed.h5", order=[n for n, _ in records]
    )
    _assert_same_content(clean, resumed)
    store = FeatureStore(resumed)
    name, features = records[3]
    got = store.get(name)
    np.testing.assert_array_equal(got["descriptors"], features["descriptors"])
    np.testing.assert_array_equal(got["keypoints"], features["locations"][:, ::-1])
    np.testing.assert_array_equal(store.global_descriptors[3], features["global_descriptor"])


def test_float16_and_binarized_options(tmp_path):
    records = _records(seed=1)
    _write_all(tmp_path / "parts", records, float16=True, binarized=True)
    store = FeatureStore(consolidate(tmp_path / "parts", tmp_path / "s.h5"))
    arrays = store.arrays()
    assert arrays["descriptors"].dtype == np.float16
    assert arrays["descriptors_binary"].shape[1] == LOCAL_DIM // 8
    name, features = records[2]
    got = store.get(name)
    np.testing.assert_allclose(got["descriptors"], features["descriptors"], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(
        binarize.unpack_binary(got["descriptors_binary"], LOCAL_DIM),
        binarize.binarize(features["descriptors"]),
    )
    with pytest.raises(ValueError, match="same options"):
        FeatureStoreWriter(tmp_path / "parts", float16=False, binarized=True)


def test_binarize_packing_and_hamming():
    x = np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.0, 1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(binarize.binarize(x), [[1, -1, -1, 1, -1, 1, -1, 1, -1]])
    packed = binarize.pack_binary(x)
    assert packed.shape == (1, 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(binarize.unpack_binary(packed, 9), binarize.binarize(x))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 128)), rng.normal(size=(4, 128))
    hamming = binarize.hamming_distances(binarize.pack_binary(a), binarize.pack_binary(b))
    dots = binarize.binarize(a) @ binarize.binarize(b).T
    np.testing.assert_array_equal(dots, 128 - 2 * hamming)


def test_delf_and_datum_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    locations = rng.uniform(0, 100, (5, 2)).astype(np.float32)
    scales = np.float32([0.5, 1, 2, 4, 1])
    descriptors = rng.normal(size=(5, 128)).astype(np.float32)
    attention = rng.uniform(size=5).astype(np.float32)
    delf_io.write_delf(tmp_path / "a.delf", locations, scales, descriptors, attention)
    got = delf_io.read_delf(tmp_path / "a.delf")
    for expected, value in zip((locations, scales, descriptors, attention, np.zeros(5)), got):
        np.testing.assert_array_equal(value, expected)
    # Official field usage: y = locations[:, 0], x = locations[:, 1], strength = attention.
    from delg_tf.protos import feature_pb2

    proto = feature_pb2.DelfFeatures.FromString((tmp_path / "a.delf").read_bytes())
    assert proto.feature[1].y == locations[1, 0] and proto.feature[1].x == locations[1, 1]
    assert proto.feature[1].strength == attention[1]
    assert list(proto.feature[1].descriptor.shape.dim) == [128]

    global_descriptor = rng.normal(size=2048).astype(np.float32)
    delf_io.write_datum(tmp_path / "a.delg_global", global_descriptor)
    np.testing.assert_array_equal(delf_io.read_datum(tmp_path / "a.delg_global"), global_descriptor)
    codes = np.arange(12, dtype=np.uint32).reshape(3, 4)
    delf_io.write_datum(tmp_path / "codes.datum", codes)
    np.testing.assert_array_equal(delf_io.read_datum(tmp_path / "codes.datum"), codes)
    delf_io.write_delf(tmp_path / "empty.delf", np.zeros((0, 2)), [], np.zeros((0, 128)), [])
    assert delf_io.read_delf(tmp_path / "empty.delf")[0].shape == (0, 2)
    (tmp_path / "bad.delf").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="bad.delf"):
        delf_io.read_delf(tmp_path / "bad.delf")


def test_images_without_features_mix_with_others(tmp_path):
    empty = {
        "image_shape": (8, 8, 3),
        "global_descriptor": np.zeros(0, np.float32),
        "locations": np.zeros((0, 2)),
        "descriptors": np.zeros((0, 0)),
        "attention": np.zeros(0),
        "scales": np.zeros(0),
    }
    records = [("a_tiny.png", empty), ("b_tiny.png", empty)] + _records()[:3]
    _write_all(tmp_path / "parts", records)  # first part: only featureless images
    store = FeatureStore(consolidate(tmp_path / "parts", tmp_path / "s.h5"))
    assert store.global_descriptors.shape == (5, GLOBAL_DIM)
    np.testing.assert_array_equal(store.global_descriptors[0], 0.0)
    assert store.get("a_tiny.png")["descriptors"].shape == (0, LOCAL_DIM)
    np.testing.assert_array_equal(
        store.get(records[3][0])["descriptors"], records[3][1]["descriptors"]
    )


def test_store_names_are_keys_never_paths(tmp_path):
    """Absolute, `..` and unicode image names are stored verbatim and only as data: the
    writer's files are its part files, whatever the names (issue 12)."""
    names = [
        "/abs/dir/a.jpg",
        "../../escape.jpg",
        "C:\\win\\b.jpg",
        "église/東京_😀.png",
        "x/../y.jpg",
    ]
    records = [(name, features) for name, (_, features) in zip(names, _records())]
    _write_all(tmp_path / "out" / "parts", records)
    store_path = consolidate(tmp_path / "out" / "parts", tmp_path / "out" / "s.h5", order=names)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "out/parts/part-000000.h5",
        "out/parts/part-000001.h5",
        "out/parts/part-000002.h5",
        "out/s.h5",
    ]
    store = FeatureStore(store_path)
    assert store.names == names
    np.testing.assert_array_equal(
        store.get("../../escape.jpg")["descriptors"], records[1][1]["descriptors"]
    )


def _write_store(directory, records, path, **kwargs):
    _write_all(directory, records, **kwargs)
    return consolidate(directory, path, order=[n for n, _ in records])


def test_shard_files_read_as_one_store_like_the_single_file(tmp_path, monkeypatch):
    """`extract --num_shards` outputs (a glob or a list), a parts directory and the single
    consolidated file of the same images give the same arrays, element-wise."""
    import concurrent.futures

    from delg_tf.extraction import store as store_module

    empty = {
        "image_shape": (8, 8, 3),
        "global_descriptor": np.zeros(0, np.float32),
        "locations": np.zeros((0, 2)),
        "descriptors": np.zeros((0, 0)),
        "attention": np.zeros(0),
        "scales": np.zeros(0),
    }
    # Featureless images first: the first part file has no global descriptors and (0, 0)
    # local descriptors (their sizes are not known yet).
    records = [("jpg/tiny.jpg", empty), ("tiny_b.png", empty)] + _records(seed=2)
    names = [n for n, _ in records]
    single = _write_store(
        tmp_path / "single.parts", records, tmp_path / "features.h5", float16=True, binarized=True
    )
    num_shards = 3
    (tmp_path / "out").mkdir()
    shard_files = [
        _write_store(
            tmp_path / f"s{k}.parts",
            records[k::num_shards],
            tmp_path / "out" / f"features-{k:05d}-of-{num_shards:05d}.h5",
            float16=True,
            binarized=True,
        )
        for k in range(num_shards)
    ]
    monkeypatch.setattr(store_module, "MAX_OPEN_FILES", 2)  # handles evicted while reading
    reference = FeatureStore(single)
    sources = {
        "glob": str(tmp_path / "out" / "features-*-of-00003.h5"),
        "list": shard_files,
        "parts": tmp_path / "single.parts",
    }
    for label, source in sources.items():
        with FeatureStore(source) as store:
            assert sorted(store.names) == sorted(names), label
            assert store.global_dim == GLOBAL_DIM
            for name in names:
                got, want = store.get(name), reference.get(name)
                assert sorted(got) == sorted(want), (label, name)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{label} {key}")
            # Dataset names (no extension, jpg/ prefix) in another order, one absent.
            wanted = [
                n[len("jpg/") : -len(".jpg")] if n.startswith("jpg/") else n.rsplit(".")[0]
                for n in names[::-1]
            ] + ["absent"]
            for binary in (False, True):
                got = store.select(wanted, binary=binary, allow_missing=True)
                want = reference.select(wanted, binary=binary, allow_missing=True)
                assert got.missing == want.missing == ["absent"]
                np.testing.assert_array_equal(got.global_, want.global_)
                assert got.global_.dtype == np.float32 and not got.global_[-1].any()
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    threaded = list(pool.map(got.local, list(range(len(wanted))) * 3))
                for i, (locations, descriptors) in enumerate(threaded):
                    expected = want.local(i % len(wanted))
                    assert descriptors.dtype == (np.uint8 if binary else np.float32)
                    np.testing.assert_array_equal(locations, expected[0])
                    np.testing.assert_array_equal(descriptors, expected[1])
                assert threaded[len(wanted) - 1][1].shape == (
                    0,
                    LOCAL_DIM // 8 if binary else LOCAL_DIM,
                )
        with pytest.raises(ValueError, match="1 image.*not in.*extract them first"):
            FeatureStore(source).select(wanted)
    # Every shard of a glob must be there.
    shard_files[1].rename(tmp_path / "elsewhere.h5")
    with pytest.raises(ValueError, match="misses 1 shard.*features-00001-of-00003.h5"):
        FeatureStore(sources["glob"])


def test_a_name_in_two_shards_is_refused_naming_both_files(tmp_path):
    records = _records(seed=3)
    first = _write_store(tmp_path / "a.parts", records[:4], tmp_path / "a.h5")
    second = _write_store(tmp_path / "b.parts", records[3:], tmp_path / "b.h5")
    with pytest.raises(ValueError, match=f"{records[3][0]}.*in {first} and {second}"):
        FeatureStore([first, second])
    with pytest.raises(ValueError, match="no file"):
        FeatureStore(str(tmp_path / "nothing-*.h5"))
    # Shards of another extraction (other descriptor sizes) are refused too.
    other = [
        (f"other_{k}.jpg", {**f, "global_descriptor": f["global_descriptor"][:8]})
        for k, (_, f) in enumerate(records)
    ]
    third = _write_store(tmp_path / "c.parts", other, tmp_path / "c.h5")
    with pytest.raises(ValueError, match=r"global_descriptors.*\(8,\).*a.h5 has \(16,\)"):
        FeatureStore([first, third])


def test_names_and_options_of_a_file_by_path_and_by_stream(tmp_path):
    """The Beam pipeline reads remote shards as streams: same answer as from the path."""
    import io

    from delg_tf.extraction.store import StoreCorruptedError, file_names_and_options

    records = _records(3)
    path = _write_store(tmp_path / "parts", records, tmp_path / "s.h5", binarized=True)
    by_path = file_names_and_options(path)
    by_stream = file_names_and_options(io.BytesIO(path.read_bytes()), what="remote/s.h5")
    assert by_path == by_stream == ([n for n, _ in records], {"float16": False, "binarized": True})
    with pytest.raises(StoreCorruptedError, match="remote/s.h5"):
        file_names_and_options(io.BytesIO(path.read_bytes()[:500]), what="remote/s.h5")
