"""Benchmark: re-ranking a query's top-100 (1000 local features per image).

Compares delg_tf (matrix-product putative matching + pycolmap LO-RANSAC, thread
pool) in three ways, the batched path of ``Reranker`` (the shortlist matched
against the query by ``find_putative_matches_batch``: a bfloat16 screen through
TensorFlow / oneDNN rules out most query rows with a rigorous error bound, the
entries it cannot rule out are recomputed and certified; then RANSAC per pair), the same
without the screen (float32 product for every row, ``Reranker(screen=False)``)
and the per-pair path (``match_pair`` for each pair in the same pool, as
``Reranker`` did before), with a baseline written the way the official DELF/DELG code does it
(``scipy.spatial.cKDTree.query(..., distance_upper_bound=1.0, workers=-1)``
followed by ``skimage.measure.ransac(..., AffineTransform, min_samples=3,
residual_threshold=20, max_trials=1000)``; pairs with <= 3 putative matches
score 0). Features are synthetic (``delg_tf.matching.synthetic``): positives
share an affine-related region with the query (10-30% inliers among their
putative matches), negatives have only false putative matches.

Prints one table: wall time per query for each method (delg_tf: minimum over repeats, the
three paths run alternately so all see the same load; the baseline runs once, it is
slow), the speed-ups, the oracle rows (the batched path's putative matches, inlier
counts and ranking equal to the per-pair path's; its pairs recomputed per pair because a
decision was within the float32 rounding bound; the query rows the screen left open), a
breakdown (screen / float32 matching / RANSAC), 1-vs-2-thread timing, matching from 2
threads with BLAS limited to one thread vs unlimited; unless ``--no_baseline``: matching
per pair (matrix product vs cKDTree, and whether they give the same matches), the
inlier-count agreement with the baseline, then one line per positive: true
correspondences, putative matches, delg_tf inliers and the baseline's inliers for each
``--ransac_seeds`` value. The header gives the load
average (the machine may be shared: timings are noisy). Usage:

    python bench/rerank.py            # top-100, ~1 min on 2 CPU cores
    python bench/rerank.py --quick    # top-25, a few seconds
    python bench/rerank.py --ransac_seeds=0,1,2   # the baseline's RANSAC with 3 seeds
    python bench/rerank.py --no_baseline   # delg_tf rows only (the baseline: tens of s)

``--data_seed`` generates the features; ``--ransac_seeds`` seed skimage's RANSAC in the
baseline (the first one for the table, every one for the per-positive lines, which rerun
the baseline on the positives only). delg_tf's pycolmap RANSAC keeps its fixed seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from delg_tf.matching import colmap_ransac
from delg_tf.matching import correspondences as corr
from delg_tf.matching import synthetic as syn
from delg_tf.matching.defaults import (
    DEFAULT_DESCRIPTOR_THRESHOLD as DESCRIPTOR_THRESHOLD,
    DEFAULT_RANSAC_ITERATIONS as RANSAC_TRIALS,
    DEFAULT_RANSAC_RESIDUAL_THRESHOLD as RESIDUAL_THRESHOLD,
)
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import MatchingConfig, limit_blas_threads, match_pair
from delg_tf.retrieval import rerank as rr

MIN_RANSAC_SAMPLES = 3  # official code
AGREEMENT_TOLERANCE = 0.05  # +-5 %
SPEEDUP_TARGET = 50.0
# Issue 15, item 6: top-100 re-ranking on 2 cores (other shortlists: scaled linearly).
SECONDS_PER_QUERY_TARGET = 0.1
TARGET_SHORTLIST = 100


def baseline_num_inliers(query: LocalFeatures, db: LocalFeatures, seed: int) -> int:
    """Official-DELF-style verification: cKDTree + skimage RANSAC."""
    from scipy import spatial
    from skimage import measure, transform

    if len(query) == 0 or len(db) == 0:
        return 0
    tree = spatial.cKDTree(db.descriptors)
    _, indices = tree.query(
        query.descriptors, distance_upper_bound=DESCRIPTOR_THRESHOLD, workers=-1
    )
    valid = indices != len(db)
    query_locations = query.keypoints[valid]
    db_locations = db.keypoints[indices[valid]]
    if query_locations.shape[0] <= MIN_RANSAC_SAMPLES:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, inliers = measure.ransac(
            (db_locations, query_locations),
            transform.AffineTransform,
            min_samples=MIN_RANSAC_SAMPLES,
            residual_threshold=RESIDUAL_THRESHOLD,
            max_trials=RANSAC_TRIALS,
            rng=seed,
        )
    return 0 if inliers is None else int(np.sum(inliers))


def _timeit(fn, repeats):
    """Minimum wall time over ``repeats`` runs (robust to other load on a shared machine)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def _timeit_alternating(fns, repeats):
    """Like :func:`_timeit` for several functions, run in turn so they share the load."""
    times = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return [min(t) for t in times], results


def per_pair_inliers(pool, query: LocalFeatures, feats, config: MatchingConfig) -> np.ndarray:
    """The per-pair path: ``match_pair`` for each pair in ``pool`` (None: serial), BLAS 1 thread."""

    def count(f):
        return match_pair(query, f, config).num_inliers

    with limit_blas_threads(1):
        counts = list(pool.map(count, feats)) if pool is not None else list(map(count, feats))
    return np.asarray(counts, dtype=np.int64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="top-25 shortlist instead of top-100.")
    parser.add_argument("--shortlist", type=int, default=None, help="override the shortlist size.")
    parser.add_argument("--num_features", type=int, default=syn.DEFAULT_NUM_FEATURES)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timing repeats for delg_tf (minimum)."
    )
    parser.add_argument(
        "--data_seed",
        "--seed",
        dest="data_seed",
        type=int,
        default=0,
        help="seed of the synthetic features (--seed: the former name).",
    )
    parser.add_argument(
        "--ransac_seeds",
        "--ransac_seed",
        dest="ransac_seeds",
        default="0",
        help="comma-separated seeds of the baseline's skimage RANSAC (first: the table).",
    )
    parser.add_argument(
        "--no_baseline",
        action="store_true",
        help="skip the official-style baseline (cKDTree + skimage, ~30-50 s at top-100) and "
        "the rows comparing with it.",
    )
    args = parser.parse_args(argv)
    try:
        ransac_seeds = [int(s) for s in args.ransac_seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(
            f"--ransac_seeds: expected comma-separated integers, received {args.ransac_seeds!r}"
        )
    if not ransac_seeds:
        parser.error("--ransac_seeds: expected at least one seed")

    shortlist = args.shortlist or (25 if args.quick else 100)
    num_positives = max(1, shortlist // 10)
    rng = np.random.default_rng(args.data_seed)
    query, pairs, is_pos = syn.make_shortlist(rng, shortlist, num_positives, args.num_features)
    feats = [p.features for p in pairs]
    ids = np.arange(shortlist)

    print(
        f"re-ranking top-{shortlist}, {args.num_features} features/image, dim {syn.DEFAULT_DIM}, "
        f"{num_positives} positives; cpus={os.cpu_count()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"pycolmap {colmap_ransac.pycolmap_version()}; data seed {args.data_seed}, baseline "
        f"RANSAC seed(s) {','.join(map(str, ransac_seeds))}"
    )
    screen_error = corr.bfloat16_screen_error()
    print(
        "bfloat16 screen: "
        + ("available" if screen_error is None else f"unavailable ({screen_error})")
        + (
            f"; ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
            if os.environ.get("ONEDNN_MAX_CPU_ISA")
            else ""
        )
    )

    # delg_tf, batched (Reranker, with and without the screen) and per-pair paths: warm up
    # once (BLAS/thread pool/TensorFlow graph), then the minimum over repeats, alternating.
    config = MatchingConfig()

    def per_pair_query(pool):
        inliers = per_pair_inliers(pool, query, feats, config)
        order = rr.rerank_order(inliers, -np.arange(shortlist, dtype=float))
        return rr.RerankResult(ids[order], ids, inliers)

    with (
        rr.Reranker(config, shortlist_size=shortlist, num_workers=args.num_workers) as reranker,
        rr.Reranker(
            config, shortlist_size=shortlist, num_workers=args.num_workers, screen=False
        ) as reranker_f32,
        ThreadPoolExecutor(args.num_workers) as pool,
    ):
        reranker.rerank_query(query, ids, feats)
        reranker_f32.rerank_query(query, ids, feats)
        per_pair_query(pool)
        (t_ours, t_f32, t_pp), (res, res_f32, res_pp) = _timeit_alternating(
            [
                lambda: reranker.rerank_query(query, ids, feats),
                lambda: reranker_f32.rerank_query(query, ids, feats),
                lambda: per_pair_query(pool),
            ],
            args.repeats,
        )
    with rr.Reranker(config, shortlist_size=shortlist, num_workers=1) as reranker:
        (t_ours_1, t_pp_1), _ = _timeit_alternating(
            [lambda: reranker.rerank_query(query, ids, feats), lambda: per_pair_query(None)],
            args.repeats,
        )
    ours = res.num_inliers

    # Breakdown of delg_tf (single thread, single BLAS thread; the screen's TensorFlow
    # product uses TensorFlow's own threads).
    batch_stats = corr.BatchMatchStats()
    dbs = [f.descriptors for f in feats]
    q32 = query.descriptors.astype(np.float32)
    q_sq = np.einsum("ij,ij->i", q32, q32)
    with limit_blas_threads(1):
        timed = [
            lambda: [corr.find_putative_matches(query.descriptors, d) for d in dbs],
            lambda: corr.find_putative_matches_batch(query.descriptors, dbs),
            lambda: corr.find_putative_matches_batch(query.descriptors, dbs, screen=False),
        ]
        if screen_error is None:
            timed.append(
                lambda: corr.screened_matches(q32, q_sq, dbs, DESCRIPTOR_THRESHOLD**2, False)
            )
        times, outputs = _timeit_alternating(timed, args.repeats)
        t_match, t_match_batch, t_match_f32 = times[:3]
        matches, batch_matches = outputs[:2]
        t_screen = times[3] if screen_error is None else None
        corr.find_putative_matches_batch(query.descriptors, dbs, stats=batch_stats)
        t_ransac, _ = _timeit(
            lambda: [
                colmap_ransac.estimate_affine_ransac(f.keypoints[d], query.keypoints[q])
                for f, (q, d) in zip(feats, matches)
            ],
            args.repeats,
        )

        # Same RANSAC calls from 2 threads: faster only if pycolmap releases the GIL.
        def verify(item):
            f, (q, d) = item
            return colmap_ransac.estimate_affine_ransac(f.keypoints[d], query.keypoints[q])

        with ThreadPoolExecutor(2) as pool:
            t_ransac_2, _ = _timeit(
                lambda: list(pool.map(verify, zip(feats, matches))), args.repeats
            )

    # Matching from 2 threads, BLAS limited to 1 thread (what Reranker does) vs unlimited.
    def match_all(pool):
        return list(
            pool.map(lambda f: corr.find_putative_matches(query.descriptors, f.descriptors), feats)
        )

    with ThreadPoolExecutor(2) as pool:
        with limit_blas_threads(1):
            t_pool_limited, _ = _timeit(lambda: match_all(pool), args.repeats)
        t_pool_free, _ = _timeit(lambda: match_all(pool), args.repeats)

    # Oracle: the batched path against the per-pair path.
    same_batch_matches = sum(
        np.array_equal(q, bq) and np.array_equal(d, bd)
        for (q, d), (bq, bd) in zip(matches, batch_matches)
    )
    same_inliers = int(np.sum(ours == res_pp.num_inliers))
    same_inliers_f32 = int(np.sum(res_f32.num_inliers == res_pp.num_inliers))
    same_ranking = np.array_equal(res.ranking, res_pp.ranking) and np.array_equal(
        res_f32.ranking, res_pp.ranking
    )
    t_per_target = t_ours * TARGET_SHORTLIST / shortlist
    open_share = batch_stats.open_rows / max(batch_stats.screened_rows, 1)
    rows = [
        ("delg_tf batched, %d threads: s/query" % args.num_workers, f"{t_ours:.3f}"),
        (
            "delg_tf batched without screen, %d threads" % args.num_workers,
            f"{t_f32:.3f}  ({t_f32 / t_ours:.2f}x)",
        ),
        ("delg_tf per-pair, %d threads: s/query" % args.num_workers, f"{t_pp:.3f}"),
        ("  per-pair / batched", f"{t_pp / t_ours:.2f}x"),
        (
            "  batched, s per top-%d query (target <= %.2f)"
            % (TARGET_SHORTLIST, SECONDS_PER_QUERY_TARGET),
            f"{t_per_target:.3f}{'' if shortlist == TARGET_SHORTLIST else ' (scaled)'}: "
            f"{'met' if t_per_target <= SECONDS_PER_QUERY_TARGET else 'NOT met'}",
        ),
        ("delg_tf batched, 1 thread: s/query", f"{t_ours_1:.3f}"),
        ("delg_tf per-pair, 1 thread: s/query", f"{t_pp_1:.3f}  ({t_pp_1 / t_ours_1:.2f}x)"),
        (
            "oracle: putative matches batched == per-pair",
            f"{same_batch_matches} of {shortlist} pairs",
        ),
        (
            "oracle: inliers batched == per-pair (no screen)",
            f"{same_inliers} of {shortlist} pairs ({same_inliers_f32} of {shortlist})",
        ),
        ("oracle: ranking batched == per-pair (both)", str(same_ranking)),
        (
            "  batched pairs recomputed per pair (bound)",
            f"{batch_stats.fallback_pairs} of {batch_stats.pairs}",
        ),
        (
            "  query rows left open by the screen",
            f"{batch_stats.open_rows} of {batch_stats.screened_rows} ({open_share * 100:.1f}%), "
            f"{batch_stats.screen_entries} entries recomputed; "
            f"{batch_stats.unscreened_pairs} pairs unscreened"
            if batch_stats.screened_pairs
            else "- (screen not used)",
        ),
        (
            "  matching, 1 thread: per-pair / batched",
            f"{t_match:.3f} / {t_match_batch:.3f} ({t_match / t_match_batch:.2f}x)",
        ),
        (
            "    of which screen + entries (TF threads)",
            "-" if t_screen is None else f"{t_screen:.3f}",
        ),
        ("  matching, 1 thread: batched without screen", f"{t_match_f32:.3f}"),
        ("  RANSAC (pycolmap), 1 thread", f"{t_ransac:.3f}"),
        ("  RANSAC (pycolmap), 2 threads", f"{t_ransac_2:.3f}"),
        (
            "matching, 2 threads: BLAS 1 thread / unlimited",
            f"{t_pool_limited:.3f} / {t_pool_free:.3f} ({t_pool_free / t_pool_limited:.2f}x)",
        ),
        (
            "thread speed-up (1 / %d threads), batched" % args.num_workers,
            f"{t_ours_1 / t_ours:.2f}x",
        ),
    ]
    positives = np.flatnonzero(is_pos)
    # Ground truth: number of generated affine-consistent correspondences.
    truth = np.array([len(p.true_db_idx) for p in pairs])
    baseline = (
        None
        if args.no_baseline
        else _baseline_rows(
            args,
            query,
            feats,
            matches,
            ours,
            res,
            is_pos,
            truth,
            ransac_seeds,
            shortlist,
            t_ours,
            t_pp,
            t_match,
        )
    )
    if baseline is not None:
        rows += baseline["rows"]
    width = max(len(r[0]) for r in rows)
    print("-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 30))
    if baseline is not None:
        seeds = " ".join(f"{f'seed {seed}':>8s}" for seed in ransac_seeds)
        print(
            "positives (image: true correspondences, putative matches, delg_tf inliers; "
            "baseline inliers per RANSAC seed):"
        )
        print(f"  {'image':>5s} {'true':>5s} {'putative':>8s} {'delg_tf':>7s}  {seeds}")
        for row, i in enumerate(positives):
            counts = " ".join(f"{int(baseline['by_seed'][seed][row]):>8d}" for seed in ransac_seeds)
            print(f"  {i:>5d} {truth[i]:>5d} {len(matches[i][0]):>8d} {int(ours[i]):>7d}  {counts}")
        print("-" * (width + 30))
        print(baseline["verdict"])
    else:
        print("baseline (cKDTree + skimage): skipped (--no_baseline)")
    oracle_ok = same_batch_matches == shortlist and same_inliers == shortlist and same_ranking
    oracle_ok = oracle_ok and same_inliers_f32 == shortlist
    fast = t_per_target <= SECONDS_PER_QUERY_TARGET
    print(
        f"batched path: oracle (putative matches, inliers and ranking equal to the per-pair "
        f"path): {'met' if oracle_ok else 'NOT met'}; <= {SECONDS_PER_QUERY_TARGET} s per "
        f"top-{TARGET_SHORTLIST} query on {args.num_workers} threads: "
        f"{'met' if fast else 'NOT met'} ({t_per_target:.3f} s"
        f"{'' if shortlist == TARGET_SHORTLIST else ', scaled from top-%d' % shortlist}; load "
        f"average {' '.join(f'{x:.1f}' for x in os.getloadavg())})"
    )
    return 0


def _baseline_rows(
    args,
    query,
    feats,
    matches,
    ours,
    res,
    is_pos,
    truth,
    ransac_seeds,
    shortlist,
    t_ours,
    t_pp,
    t_match,
) -> dict:
    """Runs the official-style baseline once; its table rows, per-seed counts and verdict."""
    num_positives = int(is_pos.sum())
    start = time.perf_counter()
    base = np.array([baseline_num_inliers(query, f, ransac_seeds[0]) for f in feats])
    t_base = time.perf_counter() - start
    t_kd, kd_matches = _timeit(
        lambda: [
            corr.find_putative_matches_kdtree(query.descriptors, f.descriptors) for f in feats
        ],
        1,
    )
    same_matches = sum(
        np.array_equal(q, kq) and np.array_equal(d, kd)
        for (q, d), (kq, kd) in zip(matches, kd_matches)
    )
    # The baseline's RANSAC with the other seeds, positives only.
    positives = np.flatnonzero(is_pos)
    base_by_seed = {ransac_seeds[0]: base[positives]}
    for seed in ransac_seeds[1:]:
        base_by_seed[seed] = np.array(
            [baseline_num_inliers(query, feats[i], seed) for i in positives]
        )
    base_order = rr.rerank_order(base, -np.arange(shortlist, dtype=float))

    # Agreement.
    rel = np.abs(ours - base) / np.maximum(base, 1)
    pos_within = np.mean(rel[is_pos] <= AGREEMENT_TOLERANCE)

    def within_truth(counts):
        return np.mean(np.abs(counts - truth)[is_pos] <= AGREEMENT_TOLERANCE * truth[is_pos])

    neg_abs = np.abs(ours - base)[~is_pos]
    total_rel = abs(int(ours.sum()) - int(base.sum())) / max(int(base.sum()), 1)
    same_top = set(res.ranking[:num_positives].tolist()) == set(base_order[:num_positives].tolist())
    positives_on_top = set(res.ranking[:num_positives].tolist()) == set(positives.tolist())
    ratio = t_base / t_ours
    rows = [
        ("baseline (cKDTree + skimage): s/query", f"{t_base:.3f}"),
        ("  matching (cKDTree)", f"{t_kd:.3f}"),
        (
            "matching per pair: matrix product / cKDTree",
            f"{t_match / shortlist * 1e3:.1f} ms / {t_kd / shortlist * 1e3:.1f} ms "
            f"({t_kd / t_match:.1f}x)",
        ),
        ("same putative matches (matrix product, cKDTree)", f"{same_matches} of {shortlist} pairs"),
        (
            "speed-up (baseline / delg_tf batched, per-pair)",
            f"{ratio:.1f}x, {t_base / t_pp:.1f}x  (target >= {SPEEDUP_TARGET:.0f}x)",
        ),
        ("positives with inliers within +-5%", f"{pos_within * 100:.0f}% of {num_positives}"),
        (
            "positives: inliers delg_tf / baseline / truth",
            f"{int(ours[is_pos].sum())} / {int(base[is_pos].sum())} / {int(truth[is_pos].sum())}",
        ),
        (
            "positives within +-5% of truth: delg_tf, baseline",
            f"{within_truth(ours) * 100:.0f}%, {within_truth(base) * 100:.0f}%",
        ),
        (
            "negatives: mean |diff| (max)",
            f"{neg_abs.mean():.2f} ({neg_abs.max()})" if neg_abs.size else "-",
        ),
        ("total inliers relative difference", f"{total_rel * 100:.2f}%"),
        ("same top-%d after re-ranking" % num_positives, str(same_top)),
        ("true matches re-ranked to the top", str(positives_on_top)),
    ]
    verdict = (
        f"speed-up target (>= {SPEEDUP_TARGET:.0f}x): "
        f"{'met' if ratio >= SPEEDUP_TARGET else 'NOT met'}; "
        f"inlier agreement (+-5% on all positives): {'met' if pos_within == 1.0 else 'NOT met'}"
        + (
            ""
            if pos_within == 1.0
            else " (see the truth row: plain RANSAC in the baseline can miss "
            "low-inlier-ratio models that LO-RANSAC finds)"
        )
    )
    return dict(rows=rows, by_seed=base_by_seed, verdict=verdict)


if __name__ == "__main__":
    sys.exit(main())
