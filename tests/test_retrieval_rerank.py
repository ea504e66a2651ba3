"""Re-ranking by geometric verification on synthetic affine correspondences."""

import numpy as np
import pytest

from delg_tf.matching import synthetic as syn
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
    with rr.Reranker(shortlist_size=20, num_workers=1) as a, rr.Reranker(
        shortlist_size=20, num_workers=2
    ) as b:
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
