"""Benchmark: global search, exact vs faiss (flat, HNSW, IVF): recall@k and time.

    python bench/search.py [--num_db=3000] [--num_queries=20] [--dim=64] [--k=100]
        [--methods=exact,faiss_flat,faiss_hnsw,faiss_ivf] [--repeats=3] [--seed=0]

Clustered synthetic descriptors, as in tests/test_retrieval_search.py: ``--clusters``
Gaussian centres, each descriptor a centre plus noise of standard deviation ``--noise``,
L2-normalised (defaults: 3000 database and 20 query descriptors of dimension 64, 50
centres, noise 0.3, seed 0). Each method of ``delg_tf.retrieval.search.GlobalIndex``
(default parameters) is built once and searched ``--repeats`` times (minimum); prints
one table: build seconds, search seconds, the speed ratio against the exact numpy search
of the same run, and recall@k against it (``search.recall_at_k``: the fraction of the
exact top k that the method returns). faiss methods need ``pip install 'delg_tf[faiss]'``
and are skipped with a note otherwise.
"""

import argparse
import os
import sys
import time

import numpy as np

from delg_tf.retrieval import search

METHODS = ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf")


def clustered(rng, n, centers, noise):
    """n descriptors: random centres plus Gaussian noise, L2-normalised."""
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.normal(size=(n, centers.shape[1]))
    return search.l2_normalize(x)


def make_data(seed, num_db, num_queries, dim, clusters, noise):
    """(database, queries) drawn like the test data (same order of random draws)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    return clustered(rng, num_db, centers, noise), clustered(rng, num_queries, centers, noise)


def _timed(fn, repeats=1):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_db", type=int, default=3000)
    parser.add_argument("--num_queries", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="search repeats (minimum).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected a subset of {list(METHODS)}")
    if "exact" not in methods:
        methods.insert(0, "exact")  # the baseline of the ratios and of recall

    database, queries = make_data(
        args.seed, args.num_db, args.num_queries, args.dim, args.clusters, args.noise
    )
    print(
        f"bench/search.py: {args.num_db} database, {args.num_queries} query descriptors, "
        f"dim {args.dim}, {args.clusters} clusters, noise {args.noise}, seed {args.seed}, "
        f"top {args.k}; cpus={os.cpu_count()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    rows, exact_ids, exact_time = [], None, None
    for method in methods:
        try:
            index = search.GlobalIndex(method)
        except ImportError as error:
            rows.append((method, None, None, None, f"skipped: {error}"))
            continue
        t_build, _ = _timed(lambda: index.build(database))
        t_search, (ids, _) = _timed(lambda: index.search(queries, args.k), args.repeats)
        if method == "exact":
            exact_ids, exact_time = ids, t_search
        recall = search.recall_at_k(ids, exact_ids)
        rows.append((method, t_build, t_search, recall, ""))
    print(
        f"  {'method':12s} {'build s':>9s} {'search s':>9s} {'x exact':>8s} "
        f"{'recall@' + str(args.k):>11s}"
    )
    for method, t_build, t_search, recall, note in rows:
        if note:
            print(f"  {method:12s} {note}")
            continue
        print(
            f"  {method:12s} {t_build:9.4f} {t_search:9.4f} {exact_time / t_search:8.2f} "
            f"{recall:11.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
