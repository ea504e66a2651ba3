"""Truncated top-k rankings (large databases) and the GLDv2 command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from delg_tf.configs import ConfigError
from delg_tf.evaluation import pipeline
from delg_tf.evaluation import ranks as rk
from delg_tf.evaluation.config import EvaluateConfig
from delg_tf.evaluation.revisitop import PROTOCOLS, compute_map, evaluate_revisitop
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import MatchingConfig

NUM_DB, NUM_QUERIES, DIM = 300, 6, 16
SEARCH_TOP_K = 20


def _random_problem(seed=0):
    """Global descriptors where each query's easy/hard/junk images are near it."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(NUM_QUERIES, DIM)).astype(np.float32)
    db = rng.normal(size=(NUM_DB, DIM)).astype(np.float32)
    gnd = []
    ids = rng.permutation(NUM_DB)
    for q in range(NUM_QUERIES):
        easy, hard, junk = (
            ids[q * 8 : q * 8 + 3],
            ids[q * 8 + 3 : q * 8 + 6],
            ids[q * 8 + 6 : q * 8 + 8],
        )
        for i, noise in [(i, 0.5) for i in easy] + [(i, 1.5) for i in np.r_[hard, junk]]:
            db[i] = queries[q] + noise * rng.normal(size=DIM)
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    return db, queries, gnd


def _deepest_positive(ranks, gnd):
    depth = 0
    for q, g in enumerate(gnd):
        where = np.flatnonzero(np.isin(ranks[:, q], np.r_[g["easy"], g["hard"], g["junk"]]))
        depth = max(depth, int(where.max()) + 1)
    return depth


@pytest.mark.parametrize("method", ["exact", "faiss_flat"])
def test_top_k_ranking_matches_full_ranking_when_k_covers_positives(method):
    db, queries, gnd = _random_problem()
    full = pipeline.evaluate_features(db, queries, gnd, config=EvaluateConfig(), verbose=False)
    k = _deepest_positive(full.global_ranks, gnd)
    assert k < NUM_DB  # the test really truncates
    top = pipeline.evaluate_features(
        db, queries, gnd, config=EvaluateConfig(top_k=k, search_method=method), verbose=False
    )
    assert top.truncated and top.global_ranks.shape == (k, NUM_QUERIES)
    np.testing.assert_array_equal(top.global_ranks, full.global_ranks[:k])
    assert top.results["global"] == full.results["global"]
    # Scored from a file too (--ranks_path --allow_truncated_ranks).
    scored = rk.score_ranking(gnd, NUM_DB, ranks=top.global_ranks, allow_truncated=True)
    assert scored == full.results["global"]


def test_top_k_reranking_equals_full_reranking():
    db, queries, gnd = _random_problem(1)
    rng = np.random.default_rng(3)
    local = [
        LocalFeatures(rng.uniform(0, 100, (20, 2)), rng.normal(size=(20, 8)) / 3)
        for _ in range(NUM_DB + NUM_QUERIES)
    ]
    config = EvaluateConfig(
        shortlist_size=10, matching=MatchingConfig(ransac_iterations=20), num_workers=1
    )
    full = pipeline.evaluate_features(
        db, queries, gnd, local[:NUM_DB], local[NUM_DB:], config, verbose=False
    )
    k = max(_deepest_positive(full.global_ranks, gnd), config.shortlist_size)
    top = pipeline.evaluate_features(
        db,
        queries,
        gnd,
        local[:NUM_DB].__getitem__,
        local[NUM_DB:],
        EvaluateConfig(**{**vars(config), "top_k": k}),
        verbose=False,
    )
    np.testing.assert_array_equal(top.reranked_ranks, full.reranked_ranks[:k])
    assert top.results == full.results


def test_truncated_precision_is_not_overestimated():
    # Positives 0 and 1; 1 is ranked 7th in the full ranking, beyond a top-5.
    full = np.array([0, 2, 3, 4, 5, 6, 1, 7])[:, None]
    gnd = [{"ok": np.array([0, 1]), "junk": np.array([], np.int64)}]
    want = compute_map(full, gnd, kappas=(1, 5))
    got = compute_map(full[:5], gnd, kappas=(1, 5))
    np.testing.assert_allclose(got.mean_precisions, want.mean_precisions)  # P@1 = 1, P@5 = 1/5
    assert want.mean_precisions[1] == pytest.approx(0.2)
    assert got.mean_ap < want.mean_ap  # the unranked positive counts as not retrieved


def test_truncated_padding_validation():
    ranks = np.array([[3, 0], [1, -1], [-1, -1]])
    assert rk.validate_ranks(ranks, 5, 2, allow_truncated=True).shape == (3, 2)
    with pytest.raises(rk.RankingShapeError, match="padding must come last"):
        rk.validate_ranks(np.array([[3, -1], [1, 0]]), 5, 2, allow_truncated=True)
    with pytest.raises(rk.RankingShapeError, match=r"\[0, 2\)"):  # full rankings: no padding
        rk.validate_ranks(np.array([[1, 0], [0, -1]]), 2, 2)
    with pytest.raises(ConfigError, match="--top_k"):
        EvaluateConfig(top_k=10, shortlist_size=100)
    gnd = [{"easy": np.array([3]), "hard": np.array([], int), "junk": np.array([], int)}] * 2
    res = evaluate_revisitop(ranks, gnd)
    assert res["easy"]["mAP"] == pytest.approx(50.0)  # found by query 0 only
    assert np.isnan(res["hard"]["mAP"]) and set(res) == set(PROTOCOLS)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "delg_tf.evaluate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gldv2_cli_retrieval_and_recognition(tmp_path):
    sol = tmp_path / "retrieval_solution_v2.1.csv"
    sol.write_text("id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,None,Ignored\n")
    pred = tmp_path / "preds.csv"
    pred.write_text("id,images\nq1,a x b\nq2,y c\n")
    out = tmp_path / "gldv2.json"
    result = _run_cli(
        "--gldv2_task=retrieval",
        f"--gldv2_solution={sol}",
        f"--gldv2_predictions={pred}",
        f"--output_json={out}",
    )
    assert result.returncode == 0, result.stderr
    assert "mAP@100" in result.stdout and "83.33" in result.stdout and "50.00" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["public"]["mAP@100"] == pytest.approx(100 * (1 + 2 / 3) / 2)

    rsol = tmp_path / "recognition_solution_v2.1.csv"
    rsol.write_text("id,landmarks,Usage\nt1,7,Public\nt2,,Public\nt3,8,Public\n")
    rpred = tmp_path / "rpreds.csv"
    # sorted by score: t2 (non-landmark, wrong), t1 (right), t3 (wrong): (1/2) / 2.
    rpred.write_text("id,landmarks\nt1,7 0.8\nt2,3 0.9\nt3,5 0.4\n")
    result = _run_cli(
        "--gldv2_task=recognition", f"--gldv2_solution={rsol}", f"--gldv2_predictions={rpred}"
    )
    assert result.returncode == 0, result.stderr
    assert "GAP" in result.stdout and "25.00" in result.stdout and "n/a" in result.stdout

    bad = _run_cli("--gldv2_task=retrieval", f"--gldv2_solution={sol}")
    assert bad.returncode == 2 and "--gldv2_predictions" in bad.stderr
    missing = _run_cli(
        "--gldv2_task=recognition",
        f"--gldv2_solution={tmp_path / 'no.csv'}",
        f"--gldv2_predictions={rpred}",
    )
    assert missing.returncode == 2 and "--gldv2_solution" in missing.stderr
    unwritable = _run_cli(
        "--gldv2_task=retrieval",
        f"--gldv2_solution={sol}",
        f"--gldv2_predictions={pred}",
        f"--output_json={sol}/out.json",
    )
    assert unwritable.returncode == 2 and "--output_json" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr


def test_large_databases_switch_to_a_top_k_shortlist():
    from delg_tf.evaluation import end_to_end as e2e

    small = e2e.effective_evaluate_config(EvaluateConfig(), e2e.FULL_RANKING_MAX_DB)
    assert small.top_k == 0
    large = e2e.effective_evaluate_config(EvaluateConfig(), e2e.FULL_RANKING_MAX_DB + 1)
    assert large.top_k == e2e.LARGE_DB_TOP_K
    chosen = e2e.effective_evaluate_config(EvaluateConfig(top_k=500), 10**6)
    assert chosen.top_k == 500


def test_every_search_method_of_the_config_ranks_like_numpy():
    """Each --search_method the config accepts builds its index and returns the cosine top-k
    of an independent numpy ranking (exact here: on 300 vectors HNSW's ef_search = 128 and
    IVF's nprobe = all 7 lists find the true neighbours)."""
    from delg_tf.evaluation import config
    from delg_tf.retrieval import search

    db, queries, _ = _random_problem(2)
    db64, q64 = db.astype(np.float64), queries.astype(np.float64)
    cosine = (db64 / np.linalg.norm(db64, axis=1, keepdims=True)) @ (
        q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    ).T  # [NUM_DB, NUM_QUERIES]
    oracle = np.argsort(-cosine, axis=0, kind="stable")[:SEARCH_TOP_K]
    # No near-ties among the top k + 1 scores: the oracle's order is unambiguous.
    assert np.diff(np.sort(cosine, axis=0)[::-1][: SEARCH_TOP_K + 1], axis=0).max() < -1e-6
    ran = []
    for method in config.SEARCH_METHODS:
        evaluate = EvaluateConfig(
            top_k=SEARCH_TOP_K, shortlist_size=SEARCH_TOP_K, search_method=method
        )
        ranks, scores, truncated = pipeline.global_ranking(db, queries, evaluate)
        np.testing.assert_array_equal(ranks, oracle, err_msg=method)
        np.testing.assert_allclose(
            scores, np.take_along_axis(cosine, oracle, axis=0), atol=1e-5, err_msg=method
        )
        assert truncated, method
        ran.append(method)
    assert ran == ["exact", "faiss_flat", "faiss_hnsw", "faiss_ivf"]  # faiss ones included
    # A name outside the list is refused by the config and by the index alike.
    with pytest.raises(ConfigError, match="--search_method"):
        EvaluateConfig(search_method="faiss_pq")
    with pytest.raises(search.SearchError, match="unknown search method"):
        search.GlobalIndex("faiss_pq")
