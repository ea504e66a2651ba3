"""find_putative_matches_batch against its oracle, the per-pair find_putative_matches."""

import numpy as np
import pytest

from delg_tf.extraction import binarize
from delg_tf.matching import correspondences as corr
from delg_tf.matching import synthetic as syn

DIM = 32
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
