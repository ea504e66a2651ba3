"""find_putative_matches_batch against its oracle, the per-pair find_putative_matches."""

import os
import subprocess
import sys

import numpy as np
import pytest

from delg_tf.extraction import binarize
from delg_tf.matching import correspondences as corr
from delg_tf.matching import synthetic as syn

DIM = 32
# One bfloat16 matmul through TensorFlow / oneDNN (aborts where oneDNN has none).
BFLOAT16_MATMUL = (
    "import tensorflow as tf; x = tf.ones([64, 128], tf.bfloat16); "
    "print(float(tf.reduce_sum(tf.matmul(x, x, transpose_b=True))))"
)
# (threshold, mutual, ratio): the paper's threshold, mutual, ratio test, both, plain NN,
# and thresholds that keep or drop almost everything.
MODES = [
    (1.0, False, None),
    (1.0, True, None),
    (None, False, 0.8),
    (None, True, 0.9),
    (1.0, True, 0.95),
    (None, False, None),
    (1.3, False, None),
    (0.2, True, None),
    (1.0, False, 1.0),
]


def _assert_same(got, query, dbs, **kwargs):
    assert len(got) == len(dbs)
    for k, (db, (q_idx, d_idx)) in enumerate(zip(dbs, got)):
        ref_q, ref_d = corr.find_putative_matches(query, db, **kwargs)
        assert q_idx.dtype == np.int64 and d_idx.dtype == np.int64, k
        np.testing.assert_array_equal(q_idx, ref_q, err_msg=f"image {k} {kwargs}")
        np.testing.assert_array_equal(d_idx, ref_d, err_msg=f"image {k} {kwargs}")


def _float_images(rng, query):
    """Images with near-duplicates of query rows, exact duplicates, empty and 1-feature ones."""
    images = []
    for n in (40, 25, 1, 0, 2, 60):
        db = syn.random_unit(rng, n, DIM)
        if n >= 2:
            take = rng.choice(query.shape[0], size=n // 2, replace=False)
            db[: n // 2] = syn.perturb_descriptors(rng, query[take]) if n != 25 else query[take]
        images.append(db)
    dup = images[0].copy()
    dup[10:20] = dup[0:10]  # exact ties: the lowest index must win.
    images.append(dup)
    images.append(np.zeros((0, DIM), dtype=np.float32))
    return images


@pytest.fixture(scope="module")
def float_data():
    rng = np.random.default_rng(0)
    query = syn.random_unit(rng, 50, DIM)
    query[45:50] = query[0:5]  # duplicated query rows: ties in the reverse (mutual) test.
    return query, _float_images(rng, query)


@pytest.mark.parametrize("threshold,mutual,ratio", MODES)
def test_float_equals_per_pair(float_data, threshold, mutual, ratio):
    query, dbs = float_data
    kwargs = dict(threshold=threshold, mutual=mutual, ratio=ratio)
    got = corr.find_putative_matches_batch(query, dbs, **kwargs)
    _assert_same(got, query, dbs, **kwargs)


@pytest.mark.parametrize("threshold,mutual,ratio", MODES)
def test_binary_equals_per_pair(threshold, mutual, ratio):
    rng = np.random.default_rng(1)
    num_bits = 16  # few bits: Hamming distances tie all the time.
    query = np.packbits(rng.normal(size=(60, num_bits)) > 0, axis=1)
    dbs = [np.packbits(rng.normal(size=(n, num_bits)) > 0, axis=1) for n in (30, 1, 0, 2, 50)]
    dbs.append(np.concatenate([query[:20], query[:20]]))  # exact copies, duplicated.
    kwargs = dict(threshold=threshold, mutual=mutual, ratio=ratio, binary=True)
    got = corr.find_putative_matches_batch(query, dbs, **kwargs)
    _assert_same(got, query, dbs, **kwargs)
    assert sum(len(q) for q, _ in got) > 0 or threshold == 0.2


def test_binary_synthetic_delg_star():
    rng = np.random.default_rng(2)
    query, pairs, _ = syn.make_shortlist(rng, 6, 2, num_features=200)
    q = binarize.pack_binary(query.descriptors)
    dbs = [binarize.pack_binary(p.features.descriptors) for p in pairs]
    for mutual in (False, True):
        got = corr.find_putative_matches_batch(q, dbs, threshold=1.1, mutual=mutual, binary=True)
        _assert_same(got, q, dbs, threshold=1.1, mutual=mutual, binary=True)


def test_ties_pick_the_lowest_index():
    query = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    db = np.array([[0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]], dtype=np.float32)
    stats = corr.BatchMatchStats()
    ((q_idx, d_idx),) = corr.find_putative_matches_batch(query, [db], stats=stats)
    assert q_idx.tolist() == [0, 1] and d_idx.tolist() == [1, 0]
    assert stats.pairs == 1 and stats.fallback_pairs == 1  # the tie is not certain.
    # Duplicated query rows: the reverse nearest neighbour is the lowest query index.
    query = np.array([[0.6, 0.8], [0.6, 0.8]], dtype=np.float32)
    ((q_idx, d_idx),) = corr.find_putative_matches_batch(query, [db], mutual=True)
    assert q_idx.tolist() == [0] and d_idx.tolist() == [1]


def test_strict_threshold_at_the_boundary():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    d = np.array([[0.0, 0.0], [3.0, 0.0]], dtype=np.float32)  # distance exactly 1.0
    stats = corr.BatchMatchStats()
    got = corr.find_putative_matches_batch(q, [d, d], threshold=1.0, stats=stats)
    assert [g[0].size for g in got] == [0, 0] and stats.fallback_pairs == 2
    got = corr.find_putative_matches_batch(q, [d], threshold=1.0001)
    assert got[0][0].tolist() == [0]


def test_near_threshold_pairs_match_the_per_pair_path():
    # Descriptors at L2 distance within a few float32 ulps of the threshold.
    rng = np.random.default_rng(4)
    query = syn.random_unit(rng, 200, DIM)
    offsets = syn.random_unit(rng, 200, DIM)
    offsets -= np.sum(offsets * query, axis=1, keepdims=True) * query  # orthogonal to q
    offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
    dbs = []
    for eps in (-1e-6, -1e-7, 0.0, 1e-7, 1e-6):
        # |q - d|^2 = 2 - 2 cos(theta) = 1 at cos = 0.5.
        cos = 0.5 + eps
        dbs.append((cos * query + np.sqrt(1 - cos**2) * offsets).astype(np.float32))
    got = corr.find_putative_matches_batch(query, dbs, threshold=1.0)
    _assert_same(got, query, dbs, threshold=1.0)


def test_certified_path_on_synthetic_shortlist_needs_no_fallback():
    rng = np.random.default_rng(3)
    query, pairs, _ = syn.make_shortlist(rng, 8, 2, num_features=300)
    dbs = [p.features.descriptors for p in pairs]
    for threshold, mutual, ratio in MODES[:5]:
        stats = corr.BatchMatchStats()
        kwargs = dict(threshold=threshold, mutual=mutual, ratio=ratio)
        got = corr.find_putative_matches_batch(query.descriptors, dbs, stats=stats, **kwargs)
        _assert_same(got, query.descriptors, dbs, **kwargs)
        assert stats.pairs == 8 and stats.fallback_pairs == 0


def test_chunked_rows(float_data, monkeypatch):
    query, dbs = float_data
    monkeypatch.setattr(corr, "MAX_DISTANCE_MATRIX_ENTRIES", 7 * 60)  # 7 query rows per chunk
    for threshold, mutual, ratio in MODES:
        kwargs = dict(threshold=threshold, mutual=mutual, ratio=ratio)
        _assert_same(corr.find_putative_matches_batch(query, dbs, **kwargs), query, dbs, **kwargs)


def test_other_dtypes_scales_and_nan():
    rng = np.random.default_rng(5)
    query = syn.random_unit(rng, 30, DIM)
    dbs = [syn.perturb_descriptors(rng, query[:20]), syn.random_unit(rng, 10, DIM)]
    for scale, dtype in ((1.0, np.float64), (10.0, np.float32), (1e-3, np.float16)):
        q, d = (query * scale).astype(dtype), [(x * scale).astype(dtype) for x in dbs]
        for threshold in (1.0 * scale, 0.7 * scale):
            got = corr.find_putative_matches_batch(q, d, threshold=threshold, mutual=True)
            _assert_same(got, q, d, threshold=threshold, mutual=True)
    bad = dbs[0].copy()
    bad[3, 0] = np.nan
    stats = corr.BatchMatchStats()
    got = corr.find_putative_matches_batch(query, [bad], stats=stats)
    _assert_same(got, query, [bad])
    assert stats.fallback_pairs == 1


def test_empty_query_and_errors():
    d = np.zeros((5, 128), dtype=np.float32)
    got = corr.find_putative_matches_batch(np.zeros((0, 128)), [d, d])
    assert [g[0].size for g in got] == [0, 0]
    assert corr.find_putative_matches_batch(d, []) == []
    with pytest.raises(corr.DescriptorMismatchError, match="query 128 vs database 40"):
        corr.find_putative_matches_batch(d, [d, np.zeros((5, 40))])
    with pytest.raises(ValueError, match="packed uint8"):
        corr.find_putative_matches_batch(d, [d], binary=True)


def test_error_bound_covers_the_measured_difference():
    rng = np.random.default_rng(6)
    query = syn.random_unit(rng, 300, 128)
    db = syn.random_unit(rng, 400, 128)
    half = 0.5 * np.einsum("ij,ij->i", db, db)
    per_pair = query @ np.ascontiguousarray(db.T)
    per_pair -= half
    q_aug = np.hstack([query, np.ones((300, 1), np.float32)])
    batched = q_aug @ np.hstack([db, -half[:, None]]).T
    bound = corr.similarity_error_bound(
        float(np.einsum("ij,ij->i", query, query).max()), float(half.max()), 128
    )
    assert np.abs(batched.astype(np.float64) - per_pair).max() <= bound < 1e-4


# --- The bfloat16 screen (TensorFlow / oneDNN) -------------------------------------------

SCREEN_MODES = [m for m in MODES if m[0] is not None and m[2] is None]
SCREEN_MODES_KEYS = {(t, r) for t, _, r in SCREEN_MODES}


class _Result:
    """What the TensorFlow graphs return: `.numpy()` gives the array."""

    def __init__(self, value):
        self.value = value

    def numpy(self):
        return self.value


def _numpy_bfloat16_product(query_bits, db_bits):
    """Model of `corr._bfloat16_product_function()`: bfloat16 inputs (bit patterns),
    products summed in float64 (at least as exact as oneDNN's float32 accumulation),
    the [Nd, Nq] result rounded to nearest bfloat16."""
    q, d = _from_bits(np.asarray(query_bits)), _from_bits(np.asarray(db_bits))
    return _Result(_bf16_round((d.astype(np.float64) @ q.T.astype(np.float64)).astype(np.float32)))


def _numpy_bfloat16_screen(query, db, offsets, sizes, cuts, max_entries):
    """Model of `corr._bfloat16_screen_function()` (its docstring is the contract): per
    image the (db row, query row) entries whose bfloat16 product reaches the query row's
    cut, real rows only; -1 where the windows of `SCREEN_POOL_WINDOW` rows whose maximum
    reaches the cut hold more than `max_entries` entries."""
    window = corr.SCREEN_POOL_WINDOW
    cut_values = _from_bits(np.asarray(cuts))
    found, counts = [], []
    for k in range(len(offsets) - 1):
        block = np.asarray(db)[offsets[k] : offsets[k + 1]]
        sim = _numpy_bfloat16_product(query, block).numpy()  # [padded rows, Nq]
        pooled = sim.reshape(-1, window, sim.shape[1]).max(axis=1)
        if np.sum(pooled >= cut_values[k][None, :]) * window > max_entries:
            found.append(np.zeros((0, 2), np.int64))
            counts.append(-1)
            continue
        d_rows, q_rows = np.nonzero(sim[: sizes[k]] >= cut_values[k][None, :])
        found.append(np.stack([d_rows, q_rows], axis=1).astype(np.int64))
        counts.append(len(d_rows))
    return _Result(np.concatenate(found)), _Result(np.asarray(counts, np.int32))


@pytest.fixture
def bfloat16_kernels(monkeypatch):
    """The screen's kernels: TensorFlow's where they run; elsewhere (no bfloat16 matmul in
    oneDNN, e.g. ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU) the numpy models above, so
    the screen's bound, certification and fallbacks are tested on every CPU."""
    if corr.bfloat16_screen_error() is None:
        return "tensorflow"
    monkeypatch.setattr(corr, "_bfloat16_product_function", lambda: _numpy_bfloat16_product)
    monkeypatch.setattr(corr, "_bfloat16_screen_function", lambda: _numpy_bfloat16_screen)
    monkeypatch.setattr(corr, "bfloat16_screen_error", lambda: None)
    return "numpy"


@pytest.mark.parametrize("threshold,mutual,ratio", MODES)
def test_screened_float_equals_per_pair(float_data, threshold, mutual, ratio, bfloat16_kernels):
    query, dbs = float_data
    kwargs = dict(threshold=threshold, mutual=mutual, ratio=ratio)
    stats = corr.BatchMatchStats()
    got = corr.find_putative_matches_batch(query, dbs, screen=True, stats=stats, **kwargs)
    _assert_same(got, query, dbs, **kwargs)
    non_empty = sum(db.shape[0] > 0 for db in dbs)
    assert stats.screened_pairs == (non_empty if (threshold, ratio) in SCREEN_MODES_KEYS else 0)


def _bf16_round(x):
    """float32 rounded to the nearest bfloat16 (ties to even), as float32 (numpy oracle)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def _bf16_truncate(x):
    """float32 truncated to bfloat16 (the screen's inputs), as float32 (numpy oracle)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _from_bits(bits):
    """float32 values of uint16 bfloat16 bit patterns."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def test_bfloat16_bits_truncate():
    x = np.array([[1.0, -1.0, 1.0 + 2**-7, 1.0 + 2**-8, 3.1415927, -(2.0**-130), 0.0]], np.float32)
    got = _from_bits(corr._bfloat16_bits(x))
    np.testing.assert_array_equal(got, _bf16_truncate(x))
    assert np.all(np.abs(got - x) <= corr.BFLOAT16_ROUNDOFF * np.abs(x))
    rng = np.random.default_rng(12)
    y = rng.normal(size=(50, 128)).astype(np.float32) * 10.0 ** rng.integers(-20, 20, (50, 1))
    assert np.all(np.abs(_from_bits(corr._bfloat16_bits(y)) - y) <= 2**-7 * np.abs(y))


def test_bfloat16_product_within_the_bound(bfloat16_kernels):
    rng = np.random.default_rng(7)
    query = syn.random_unit(rng, 300, 128)
    query[:20] *= rng.uniform(1e-3, 30.0, size=(20, 1)).astype(np.float32)
    query[20:40, :4] *= 50.0  # a few dominant components
    dbs = [syn.random_unit(rng, 500, 128), syn.random_unit(rng, 1, 128)]
    dbs.append(syn.perturb_descriptors(rng, query[:200]) * 3.0)
    dbs.append(-query[:80])
    product = corr._bfloat16_product_function()
    q_norm = np.linalg.norm(query.astype(np.float64), axis=1)
    for db in dbs:
        got = product(corr._bfloat16_bits(query), corr._bfloat16_bits(db)).numpy().T
        exact = query.astype(np.float64) @ db.astype(np.float64).T
        bound = corr.bfloat16_screen_error_bound(
            q_norm, float(np.linalg.norm(db.astype(np.float64), axis=1).max()), 128
        )
        assert np.all(np.abs(got - exact) <= bound[:, None])
        # Independent oracle: truncated bfloat16 inputs, float64 accumulation, bfloat16
        # output rounded to nearest.
        oracle = _bf16_round(
            (
                _bf16_truncate(query).astype(np.float64) @ _bf16_truncate(db).astype(np.float64).T
            ).astype(np.float32)
        )
        np.testing.assert_allclose(got, oracle, rtol=2**-7, atol=1e-6)


def test_bfloat16_floor_bits():
    x = np.array([1.0, -1.0, 0.3, -0.3, 1.0 + 2**-9, -(1.0 + 2**-9), 0.0, 1e-3, -1e-30, 1e5])
    got = _from_bits(corr._bfloat16_floor_bits(x)).astype(np.float64)
    assert np.all(got <= x)
    # The next bfloat16 up (one more unit in the last place away from -inf) is above x.
    bits = corr._bfloat16_floor_bits(x).astype(np.int64)
    up = np.where(got < 0, bits - 1, bits + 1)
    up = np.where(got == 0, 1, up)  # the smallest positive bfloat16
    assert np.all(_from_bits(up.astype(np.uint16)).astype(np.float64) > x)


def test_screen_candidates_against_the_product(bfloat16_kernels):
    rng = np.random.default_rng(13)
    query = syn.random_unit(rng, 200, 128)
    dbs = [syn.perturb_descriptors(rng, query[:50]), syn.random_unit(rng, 300, 128), query[:3]]
    cuts = rng.uniform(0.1, 0.6, size=(len(dbs), 200))
    got = corr._screen_candidates(query, dbs, cuts, max_entries=200 * 300)
    product = corr._bfloat16_product_function()
    for k, db in enumerate(dbs):
        sims = product(corr._bfloat16_bits(query), corr._bfloat16_bits(db)).numpy().T
        cut = _from_bits(corr._bfloat16_floor_bits(cuts[k]))
        ref_q, ref_d = np.nonzero(sims >= cut[:, None])  # row-major: sorted by query row
        np.testing.assert_array_equal(got[k][0], ref_q)
        np.testing.assert_array_equal(got[k][1], ref_d)
    # More entries than allowed: None for that image only.
    limit = 200 * corr.SCREEN_POOL_WINDOW  # entries are counted by pooled windows
    few = corr._screen_candidates(query, dbs, np.full((3, 200), -10.0), max_entries=limit)
    assert few[0] is None and few[1] is None and few[2][0].size == 200 * 3


def test_screen_at_and_near_the_threshold(bfloat16_kernels):
    # Nearest neighbours at squared distance 1 - eps: the screen must leave rows within
    # its bound open and the result must be the per-pair one, closed rows included.
    rng = np.random.default_rng(8)
    query = syn.random_unit(rng, 400, 128)
    offsets = syn.random_unit(rng, 400, 128)
    offsets -= np.sum(offsets * query, axis=1, keepdims=True) * query
    offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
    dbs = []
    for eps in (-0.1, -0.02, -0.005, -1e-6, 0.0, 1e-6, 0.005, 0.02, 0.1):
        cos = 0.5 + eps  # |q - d|^2 = 2 - 2 cos
        near = (cos * query + np.sqrt(1 - cos**2) * offsets).astype(np.float32)
        dbs.append(np.concatenate([near[::3], syn.random_unit(rng, 300, 128)]))
    for mutual in (False, True):
        stats = corr.BatchMatchStats()
        got = corr.find_putative_matches_batch(
            query, dbs, threshold=1.0, mutual=mutual, screen=True, stats=stats
        )
        _assert_same(got, query, dbs, threshold=1.0, mutual=mutual)
        assert stats.screened_pairs == len(dbs)
        assert stats.open_rows < stats.screened_rows  # the far images close rows
    # Far below the threshold (eps = -0.1) every near row is closed by the screen.
    stats = corr.BatchMatchStats()
    corr.find_putative_matches_batch(query, dbs[:1], screen=True, stats=stats)
    assert stats.open_rows < 10


def test_screen_duplicates_ties_and_sizes(bfloat16_kernels):
    rng = np.random.default_rng(9)
    query = syn.random_unit(rng, 120, 128)
    query[100:120] = query[0:20]  # duplicated query rows: reverse (mutual) ties
    base = syn.perturb_descriptors(rng, query[:60])
    dbs = [
        np.concatenate([base, base]),  # duplicated database rows: nearest-neighbour ties
        query[:30].copy(),  # exact copies
        base[:1],
        np.zeros((0, 128), np.float32),
        np.concatenate([base[:40], syn.random_unit(rng, 900, 128)]),  # widest image
        -query[:50],  # far on the other side
        (base[:50] * 1e-3).astype(np.float32),
    ]
    for threshold, mutual, _ in SCREEN_MODES:
        kwargs = dict(threshold=threshold, mutual=mutual)
        got = corr.find_putative_matches_batch(query, dbs, screen=True, **kwargs)
        _assert_same(got, query, dbs, **kwargs)


def test_screen_groups_and_large_thresholds(float_data, monkeypatch, bfloat16_kernels):
    query, dbs = float_data
    for threshold in (1.0, 1.5, 2.0, 5.0):  # cutoffs at and below zero similarity
        _assert_same(
            corr.find_putative_matches_batch(query, dbs, threshold=threshold, screen=True),
            query,
            dbs,
            threshold=threshold,
        )
    # Screen calls in groups of about one image, rows recomputed in chunks of 7.
    monkeypatch.setattr(corr, "MAX_DISTANCE_MATRIX_ENTRIES", 7 * 60)
    for threshold, mutual, _ in SCREEN_MODES:
        kwargs = dict(threshold=threshold, mutual=mutual)
        got = corr.find_putative_matches_batch(query, dbs, screen=True, **kwargs)
        _assert_same(got, query, dbs, **kwargs)


def test_screen_on_synthetic_shortlist_closes_most_rows(bfloat16_kernels):
    rng = np.random.default_rng(10)
    query, pairs, _ = syn.make_shortlist(rng, 12, 2, num_features=1000)
    dbs = [p.features.descriptors for p in pairs]
    for mutual in (False, True):
        stats = corr.BatchMatchStats()
        got = corr.find_putative_matches_batch(
            query.descriptors, dbs, mutual=mutual, screen=True, stats=stats
        )
        _assert_same(got, query.descriptors, dbs, mutual=mutual)
        assert stats.fallback_pairs == 0 and stats.screened_pairs == 12
        assert stats.unscreened_pairs == 0 and stats.screen_entries >= stats.open_rows
        # Open rows: only those within a few bounds of the threshold (cosine 0.5).
        q64 = query.descriptors.astype(np.float64)
        near = sum(int(np.sum((q64 @ db.T.astype(np.float64)).max(axis=1) > 0.45)) for db in dbs)
        assert stats.open_rows <= near < 0.5 * stats.screened_rows


def test_screen_dtypes_scales_and_nan(bfloat16_kernels):
    rng = np.random.default_rng(11)
    query = syn.random_unit(rng, 30, 128)
    dbs = [syn.perturb_descriptors(rng, query[:20]), syn.random_unit(rng, 10, 128)]
    scales = ((1.0, np.float64), (10.0, np.float32), (1e-3, np.float16))
    # Denormal components and squared norms (flushed to zero by bfloat16 kernels), huge.
    scales += ((1e-19, np.float32), (1e-30, np.float32), (1e15, np.float32))
    for scale, dtype in scales:
        q, d = (query * scale).astype(dtype), [(x * scale).astype(dtype) for x in dbs]
        for threshold in (1.0 * scale, 0.7 * scale):
            got = corr.find_putative_matches_batch(
                q, d, threshold=threshold, mutual=True, screen=True
            )
            _assert_same(got, q, d, threshold=threshold, mutual=True)
    bad = dbs[0].copy()
    bad[3, 0] = np.nan
    stats = corr.BatchMatchStats()
    got = corr.find_putative_matches_batch(query, [bad, dbs[1]], screen=True, stats=stats)
    _assert_same(got, query, [bad, dbs[1]])
    assert stats.fallback_pairs == 1


def test_screen_required_but_unavailable(monkeypatch):
    monkeypatch.setattr(corr, "bfloat16_screen_error", lambda: "ImportError: no tensorflow")
    q = syn.random_unit(np.random.default_rng(0), 5, 8)
    with pytest.raises(RuntimeError, match="screen=True.*no tensorflow.*screen=None or False"):
        corr.find_putative_matches_batch(q, [q], screen=True)
    stats = corr.BatchMatchStats()
    got = corr.find_putative_matches_batch(q, [q], stats=stats)  # default: exact path
    _assert_same(got, q, [q])
    assert stats.screened_pairs == 0


def test_screen_probe_rejects_a_bfloat16_accumulation(monkeypatch, bfloat16_kernels):
    # A kernel keeping its running sum in bfloat16 breaks the bound's premise: the probe
    # must refuse it (and accept the numpy float64-accumulation oracle).
    def bfloat16_accumulation(query, db):
        q, d = _from_bits(query), _from_bits(db)
        acc = np.zeros((d.shape[0], q.shape[0]), np.float32)
        for c in range(q.shape[1]):
            acc = _bf16_round(acc + d[:, c : c + 1] * q[:, c][None, :])
        return _Result(_bf16_round(acc))

    probe = corr._bfloat16_screen_probe.__wrapped__
    monkeypatch.setattr(corr, "_child_probe_error", lambda: None)
    monkeypatch.setattr(corr, "_bfloat16_product_function", lambda: bfloat16_accumulation)
    assert "does not accumulate in float32" in probe()
    monkeypatch.setattr(corr, "_bfloat16_product_function", lambda: _numpy_bfloat16_product)
    assert probe() is None  # it also runs the screen's graph (bfloat16_kernels)


def test_child_probe_reports_an_aborting_kernel(monkeypatch):
    # TensorFlow aborts the process where oneDNN has no bfloat16 matmul: the probe runs
    # the graphs in a child first and reports its exit instead of dying.
    monkeypatch.setattr(corr, "_CHILD_PROBE", "import os; os.abort()")
    reason = corr._child_probe_error()
    assert reason is not None and "ends a child process (exit code" in reason
    monkeypatch.setattr(corr, "_CHILD_PROBE", "print('ok')")
    assert corr._child_probe_error() is None


def test_child_probe_under_an_avx2_cap(monkeypatch):
    # An AVX-512 CPU capped at AVX2 has no oneDNN bfloat16 matmul (the child aborts); an
    # AVX2-only CPU may run it emulated. The parent survives, and its verdict is that of
    # an independent child running one bfloat16 matmul in the same environment.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    reason = corr._child_probe_error()
    matmul = subprocess.run(
        [sys.executable, "-c", BFLOAT16_MATMUL],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=corr.CHILD_PROBE_TIMEOUT,
    )
    if matmul.returncode == 0:
        assert reason is None, reason
    else:
        assert reason is not None and "ends a child process" in reason, reason


def test_screen_runs_by_default_only_where_it_pays_off():
    """The default rule: large float products (the paper's 1000 x 1000 x 128) are
    screened, small or low-dimensional ones (the demo's ~200 x 32) are not."""
    assert corr.screen_pays_off((1000, 128), [1000] * 100)
    assert not corr.screen_pays_off((200, 32), [197] * 100)
    assert not corr.screen_pays_off((1000, 32), [1000] * 100)  # dimension too low
    assert not corr.screen_pays_off((300, 128), [300] * 100)
    assert not corr.screen_pays_off((1000, 128), [])
    rng = np.random.default_rng(3)
    small = rng.normal(size=(50, 32)).astype(np.float32)
    stats = corr.BatchMatchStats()
    corr.find_putative_matches_batch(small, [small, small], stats=stats)
    assert stats.unscreened_pairs == 2  # not screened by default
