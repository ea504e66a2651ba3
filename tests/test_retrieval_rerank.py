"""Re-ranking by geometric verification on synthetic affine correspondences."""

import numpy as np
import pytest

from delg_tf.extraction import binarize
from delg_tf.matching import correspondences as corr
from delg_tf.matching import synthetic as syn
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import MatchingConfig, match_pair
from delg_tf.retrieval import rerank as rr

NUM_FEATURES = 300


@pytest.fixture(scope="module")
def shortlist():
    rng = np.random.default_rng(3)
    query, pairs, is_pos = syn.make_shortlist(
        rng,
        shortlist_size=20,
        num_positives=3,
        num_features=NUM_FEATURES,
        positive_putatives_range=(60, 120),
        negative_putatives_range=(5, 20),
    )
    return query, pairs, is_pos


def test_rerank_order_rule():
    inliers = np.array([5, 0, 5, 7, 0])
    scores = np.array([0.9, 0.8, 0.95, 0.1, 0.85])
    assert rr.rerank_order(inliers, scores).tolist() == [3, 2, 0, 4, 1]
    # equal inliers and scores keep input order.
    assert rr.rerank_order(np.zeros(3), np.zeros(3)).tolist() == [0, 1, 2]


def test_true_matches_move_to_top(shortlist):
    query, pairs, is_pos = shortlist
    feats = [p.features for p in pairs]
    # put the positives at the end of the global ranking (plus 5 extra images
    # that are not in the shortlist) so re-ranking has to move them.
    order = np.concatenate([np.flatnonzero(~is_pos), np.flatnonzero(is_pos)])
    ranking = np.concatenate([order, np.arange(20, 25)])
    with rr.Reranker(shortlist_size=20, num_workers=2) as reranker:
        res = reranker.rerank_query(query, ranking, lambda i: feats[i] if i < 20 else feats[0])
    assert set(res.ranking[:3].tolist()) == set(np.flatnonzero(is_pos).tolist())
    assert res.ranking[20:].tolist() == list(range(20, 25))
    assert sorted(res.ranking.tolist()) == sorted(ranking.tolist())
    for pos_in_shortlist, db_id in enumerate(res.shortlist):
        true = len(pairs[db_id].true_db_idx)
        if is_pos[db_id]:
            assert true <= res.num_inliers[pos_in_shortlist] <= true + 3


def test_threads_and_serial_agree(shortlist):
    query, pairs, _ = shortlist
    feats = [p.features for p in pairs]
    with (
        rr.Reranker(shortlist_size=20, num_workers=1) as a,
        rr.Reranker(shortlist_size=20, num_workers=2) as b,
    ):
        np.testing.assert_array_equal(
            a.count_inliers(query, feats, range(20)), b.count_inliers(query, feats, range(20))
        )


def test_rerank_all_revisitop_layout(shortlist):
    query, pairs, is_pos = shortlist
    feats = [p.features for p in pairs]
    ranks = np.stack([np.arange(20), np.arange(20)[::-1]], axis=1)
    with rr.Reranker(shortlist_size=20, num_workers=2) as reranker:
        out = reranker.rerank_all(ranks, [query, query], feats)
    assert out.shape == ranks.shape
    for q in range(2):
        assert set(out[:3, q].tolist()) == set(np.flatnonzero(is_pos).tolist())
    with pytest.raises(ValueError, match="num_queries=1"):
        rr.Reranker().rerank_all(ranks, [query], feats)


def _with_small_images(query, feats):
    """The shortlist plus an empty image and a 1-feature image."""
    dim = query.descriptors.shape[1]
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, dim), dtype=query.descriptors.dtype))
    single = LocalFeatures(feats[0].keypoints[:1], feats[0].descriptors[:1])
    return list(feats) + [empty, single]


def _binary(features):
    return LocalFeatures(features.keypoints, binarize.pack_binary(features.descriptors))


@pytest.mark.parametrize(
    "config",
    [
        MatchingConfig(),
        MatchingConfig(mutual_nearest=True),
        MatchingConfig(use_ratio_test=True, ratio_test_threshold=0.9),
        MatchingConfig(min_inliers=20, seed=7),
        MatchingConfig(binary_descriptors=True, descriptor_threshold=1.1),
    ],
    ids=["default", "mutual", "ratio", "min_inliers", "binary"],
)
@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("screen", [True, None, False], ids=["screen", "auto", "float32"])
def test_batched_inliers_and_ranking_equal_match_pair(shortlist, config, num_workers, screen):
    """Every way of matching gives match_pair's inliers: the bfloat16 screen forced (these
    small images are below the size where it runs by default), the default, float32.
    Where the screen cannot run (e.g. ONEDNN_MAX_CPU_ISA=AVX2), forcing it is refused
    with the reason and the default runs instead."""
    query, pairs, _ = shortlist
    unavailable = corr.bfloat16_screen_error()
    if screen and unavailable is not None:
        if not config.binary_descriptors:  # binary matching never screens
            with pytest.raises(RuntimeError, match="screen=True.*cannot run here"):
                with rr.Reranker(config, num_workers=num_workers, screen=True) as reranker:
                    feats = [p.features for p in pairs]
                    reranker.count_inliers(query, feats, np.arange(len(feats)))
        screen = None
    feats = _with_small_images(query, [p.features for p in pairs])
    if config.binary_descriptors:
        query, feats = _binary(query), [_binary(f) for f in feats]
    ids = np.arange(len(feats))
    reference = np.array([match_pair(query, f, config).num_inliers for f in feats])
    assert reference.max() > 0
    scores = np.random.default_rng(0).permutation(len(feats)).astype(float)
    with rr.Reranker(
        config, shortlist_size=len(feats), num_workers=num_workers, screen=screen
    ) as reranker:
        np.testing.assert_array_equal(reranker.count_inliers(query, feats, ids), reference)
        res = reranker.rerank_query(query, ids[::-1], lambda i: feats[i], scores[::-1])
    np.testing.assert_array_equal(res.num_inliers, reference[::-1])
    np.testing.assert_array_equal(
        res.ranking, ids[::-1][rr.rerank_order(reference[::-1], scores[::-1])]
    )


def test_count_inliers_empty_shortlist(shortlist):
    query, pairs, _ = shortlist
    with rr.Reranker(num_workers=2) as reranker:
        got = reranker.count_inliers(query, [p.features for p in pairs], [])
    assert got.shape == (0,) and got.dtype == np.int64
