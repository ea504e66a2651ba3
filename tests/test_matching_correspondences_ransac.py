"""Putative matching, binary (Hamming) matching and pycolmap affine RANSAC."""

import numpy as np
import pytest

from delg_tf.extraction import binarize
from delg_tf.matching import colmap_ransac
from delg_tf.matching import correspondences as corr
from delg_tf.matching import synthetic as syn


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    query = syn.make_query(rng, num_features=300)
    return query, syn.make_db_image(rng, query, num_true=60, num_false=90, num_features=300)


def test_matrix_product_matches_kdtree(pair):
    query, db = pair
    got = corr.find_putative_matches(query.descriptors, db.features.descriptors)
    ref = corr.find_putative_matches_kdtree(query.descriptors, db.features.descriptors)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert len(got[0]) == 150  # all true + false putatives, no filler.


def test_threshold_is_strict_like_kdtree():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    d = np.array([[0.0, 0.0], [3.0, 0.0]], dtype=np.float32)  # distance exactly 1.0
    assert corr.find_putative_matches(q, d, threshold=1.0)[0].size == 0
    assert corr.find_putative_matches(q, d, threshold=1.0001)[0].tolist() == [0]


def test_ratio_and_mutual():
    q = np.array([[0.0, 0.0], [0.1, 0.0]], dtype=np.float32)
    d = np.array([[0.0, 0.0], [0.0, 0.2], [5.0, 5.0]], dtype=np.float32)
    # both queries' NN is db 0; only query 0 is its mutual NN.
    qi, di = corr.find_putative_matches(q, d, threshold=1.0, mutual=True)
    assert qi.tolist() == [0] and di.tolist() == [0]
    # query 1: d1 = 0.1, d2 = sqrt(0.05) ~ 0.224 -> ratio 0.447.
    qi, _ = corr.find_putative_matches(q, d, threshold=None, ratio=0.4)
    assert qi.tolist() == [0]
    qi, _ = corr.find_putative_matches(q, d, threshold=None, ratio=0.5)
    assert qi.tolist() == [0, 1]


def test_binary_hamming_equivalence():
    rng = np.random.default_rng(1)
    dim = 128
    a = np.sign(rng.normal(size=(50, dim))).astype(np.float32)
    b = a.copy()
    # <= 45 flipped bits: each row's own copy stays its nearest neighbour
    # (unrelated rows are ~64 bits away).
    flips = rng.integers(0, 46, size=50)
    for i, f in enumerate(flips):
        b[i, rng.permutation(dim)[:f]] *= -1
    l2 = np.linalg.norm(a / np.sqrt(dim) - b / np.sqrt(dim), axis=1)
    np.testing.assert_allclose(l2**2, 4 * flips / dim, rtol=1e-5)
    pa, pb = np.packbits(a > 0, axis=1), np.packbits(b > 0, axis=1)
    np.testing.assert_array_equal(np.diag(binarize.hamming_distances(pa, pb)), flips)
    qi, di = corr.find_putative_matches(pa, pb, threshold=1.1, binary=True)
    np.testing.assert_array_equal(qi, np.flatnonzero(l2 < 1.1))
    np.testing.assert_array_equal(di, qi)
    with pytest.raises(ValueError, match="packed uint8"):
        corr.find_putative_matches(a, b, binary=True)


def test_empty_and_mismatched_descriptors():
    d = np.zeros((5, 128), dtype=np.float32)
    assert corr.find_putative_matches(np.zeros((0, 128)), d)[0].size == 0
    assert corr.find_putative_matches(d, np.zeros((0, 128)))[0].size == 0
    with pytest.raises(corr.DescriptorMismatchError, match="query 128 vs database 40"):
        corr.find_putative_matches(d, np.zeros((5, 40)))


def test_ransac_recovers_affine_inliers(pair):
    query, db = pair
    qi, di = corr.find_putative_matches(query.descriptors, db.features.descriptors)
    res = colmap_ransac.estimate_affine_ransac(db.features.keypoints[di], query.keypoints[qi])
    true = set(zip(db.true_query_idx.tolist(), db.true_db_idx.tolist()))
    found = set(zip(qi[res.inlier_mask].tolist(), di[res.inlier_mask].tolist()))
    assert true <= found and len(found) - len(true) <= 3
    np.testing.assert_allclose(res.model, db.db_to_query, atol=0.05 * np.abs(db.db_to_query).max())
    again = colmap_ransac.estimate_affine_ransac(db.features.keypoints[di], query.keypoints[qi])
    assert again.num_inliers == res.num_inliers  # deterministic seed


@pytest.mark.parametrize("num", [0, 1, 2, 3])
def test_ransac_too_few_correspondences(num):
    pts = np.arange(2 * num, dtype=np.float64).reshape(num, 2)
    res = colmap_ransac.estimate_affine_ransac(pts, pts)
    assert res.num_inliers == 0 and res.model is None and res.inlier_mask.shape == (num,)


def test_ransac_shape_error():
    with pytest.raises(ValueError, match="same M"):
        colmap_ransac.estimate_affine_ransac(np.zeros((5, 2)), np.zeros((4, 2)))


def test_pycolmap_version_check():
    colmap_ransac.check_pycolmap_version("4.2.1")
    for bad in ("4.3.0", "3.11.1", "not-a-version"):
        with pytest.raises(colmap_ransac.PycolmapVersionError, match=r"pycolmap>=4\.2,<4\.3"):
            colmap_ransac.check_pycolmap_version(bad)


def test_only_colmap_ransac_imports_pycolmap():
    import pathlib
    import re

    import delg_tf

    root = pathlib.Path(delg_tf.__file__).parent
    offenders = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if re.search(r"^\s*(import|from)\s+pycolmap", p.read_text(encoding="utf-8"), re.M)
    ]
    assert offenders == ["matching/colmap_ransac.py"]


def test_chunked_distance_matrix_gives_same_matches(pair, monkeypatch):
    query, db = pair
    args = (query.descriptors, db.features.descriptors)
    full = [corr.find_putative_matches(*args, mutual=True, ratio=0.9, threshold=1.0)]
    full.append(corr.find_putative_matches(*args))
    monkeypatch.setattr(corr, "MAX_DISTANCE_MATRIX_ENTRIES", 7 * 300)  # 7 query rows per chunk
    chunked = [corr.find_putative_matches(*args, mutual=True, ratio=0.9, threshold=1.0)]
    chunked.append(corr.find_putative_matches(*args))
    for (fq, fd), (cq, cd) in zip(full, chunked):
        np.testing.assert_array_equal(fq, cq)
        np.testing.assert_array_equal(fd, cd)
    assert 0 < len(full[0][0]) <= len(full[1][0])
