"""Revisitop metrics: hand-computed fixtures, edge cases, oracle comparison."""

import math

import numpy as np
import pytest

from delg_tf.evaluation import revisitop as rv


def _oracle_map(ranks, gnd, kappas):
    """Straightforward loop version of the revisitop protocol (test oracle)."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok = list(g["ok"])
        if not ok:
            continue
        junk = set(g["junk"])
        positions, seen = [], 0
        for i, idx in enumerate(ranks[:, q]):
            if idx in junk and idx not in ok:
                seen += 1
            elif idx in ok:
                positions.append(i - seen)
        ap = 0.0
        for j, r in enumerate(positions):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / len(ok)
        aps.append(ap)
        pos1 = np.array(positions) + 1
        prs.append([(pos1 <= min(pos1.max(), k)).sum() / min(pos1.max(), k) for k in kappas])
    return np.mean(aps), np.mean(prs, axis=0)


def test_ap_two_positives_no_junk():
    # positives at positions 0 and 2: (1 + 1)/2 + (1/2 + 2/3)/2, divided by 2.
    res = rv.compute_map(np.arange(5)[:, None], [{"ok": np.array([0, 2]), "junk": np.array([])}])
    assert res.mean_ap == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    np.testing.assert_allclose(res.mean_precisions, [1.0, 2 / 3, 2 / 3])


def test_junk_removed_before_positives():
    # ranking 0..4, positives {2, 4}, junk {1}: junk-free positions 1 and 3.
    res = rv.compute_map(np.arange(5)[:, None], [{"ok": np.array([2, 4]), "junk": np.array([1])}])
    expected_ap = ((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert res.mean_ap == pytest.approx(expected_ap)
    # revisitop P@k: kq = min(max(pos), k); 1-based positions [2, 4].
    np.testing.assert_allclose(res.mean_precisions, [0.0, 2 / 4, 2 / 4])


def test_positive_at_the_end():
    res = rv.compute_map(np.arange(5)[:, None], [{"ok": np.array([4]), "junk": np.array([])}])
    assert res.mean_ap == pytest.approx((0 + 1 / 5) / 2)
    np.testing.assert_allclose(res.mean_precisions, [0.0, 1 / 5, 1 / 5])


def test_everything_else_junk_gives_perfect_ap():
    res = rv.compute_map(
        np.arange(5)[:, None], [{"ok": np.array([3]), "junk": np.array([0, 1, 2, 4])}]
    )
    assert res.mean_ap == pytest.approx(1.0)
    np.testing.assert_allclose(res.mean_precisions, [1.0, 1.0, 1.0])


def test_query_without_positives_is_excluded():
    ranks = np.tile(np.arange(5)[:, None], (1, 2))
    gnd = [
        {"ok": np.array([], dtype=int), "junk": np.array([0, 1, 2, 3, 4])},
        {"ok": np.array([0]), "junk": np.array([])},
    ]
    res = rv.compute_map(ranks, gnd)
    assert math.isnan(res.aps[0])
    assert res.num_evaluated == 1
    assert res.mean_ap == pytest.approx(1.0)


def test_all_queries_without_positives_gives_nan_not_crash():
    res = rv.compute_map(
        np.arange(3)[:, None], [{"ok": np.array([], dtype=int), "junk": np.arange(3)}]
    )
    assert math.isnan(res.mean_ap) and res.num_evaluated == 0


def test_protocols_split_easy_hard_junk():
    ranks = np.arange(6)[:, None]
    gnd = [{"easy": np.array([1]), "hard": np.array([0]), "junk": np.array([2])}]
    out = rv.evaluate_revisitop(ranks, gnd)
    # easy: hard image 0 is junk -> easy image at junk-free position 0.
    assert out["easy"]["mAP"] == pytest.approx(100.0)
    # medium: positives at 0, 1.
    assert out["medium"]["mAP"] == pytest.approx(100.0)
    # hard: easy image 1 is junk, hard image at position 0.
    assert out["hard"]["mAP"] == pytest.approx(100.0)
    ranks = np.array([5, 4, 3, 2, 1, 0])[:, None]
    out = rv.evaluate_revisitop(ranks, gnd)
    # hard: ranking 5,4,[3?],2(junk),1(junk),0 -> junk-free position of 0 is 3.
    assert out["hard"]["mAP"] == pytest.approx((0 + 1 / 4) / 2 * 100)
    assert set(out["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10"}


def test_matches_oracle_on_random_rankings():
    rng = np.random.default_rng(0)
    num_db, num_q = 60, 7
    ranks = np.stack([rng.permutation(num_db) for _ in range(num_q)], axis=1)
    gnd = []
    for q in range(num_q):
        perm = rng.permutation(num_db)
        n_ok, n_junk = rng.integers(0, 8), rng.integers(0, 10)
        gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok : n_ok + n_junk]})
    res = rv.compute_map(ranks, gnd)
    exp_map, exp_pr = _oracle_map(ranks, gnd, rv.DEFAULT_KAPPAS)
    assert res.mean_ap == pytest.approx(exp_map, abs=1e-12)
    np.testing.assert_allclose(res.mean_precisions, exp_pr, atol=1e-12)


def test_ranks_columns_must_match_queries():
    with pytest.raises(ValueError, match="columns"):
        rv.compute_map(np.arange(5)[:, None], [{"ok": [0]}, {"ok": [1]}])


def test_format_table_contains_rows():
    res = rv.evaluate_revisitop(np.arange(3)[:, None], [{"easy": [0], "hard": [1], "junk": []}])
    table = rv.format_results_table({"global": res, "reranked": res})
    assert "global" in table and "reranked" in table and "hard mP@10" in table
