"""Benchmark: the global index on disk at 1M images (build, size, memory, latency, recall).

    python bench/index.py                          # N = 1,000,000 at dims 2048 and 128
    python bench/index.py --num=20000 --dims=64    # a smoke run (about a minute)

For each dimension of `--dims`, `--num` synthetic descriptors with cluster structure
(below) are written chunk-wise into a sharded feature store (`--shards` files
`features-SSSSS-of-NNNNN.h5`, the layout of `delg_tf.extraction.store`, never two
copies in memory), then, for each method of `delg_tf.retrieval.index` and a few
settings:

* build: `build` + `save` of the library (store reads in chunks, training, add, atomic
  write) in a fresh subprocess: seconds, and that process's peak RSS (VmHWM, the
  kernel's ru_maxrss of the process's own address space: faiss allocates outside
  Python, so tracemalloc would not see it);
* the index folder's size on disk;
* search: another fresh subprocess loads the folder (`load_index`) and searches the
  `--num_queries` queries in one batch (ms/query = total / Q) and the first
  `--single_queries` one at a time (mean ms/query), for each search setting (IVF
  nprobe, HNSW ef_search); its peak RSS; recall@k (`search.recall_at_k`) against the
  exact top k computed in the parent with numpy (`search.exact_search` over store
  chunks);
* one table per run with the ratios against flat (exact faiss) search of the same run:
  speed-up of single and batched search, size on disk relative to flat; then whether a
  setting reaches the target (recall@k >= `--target_recall` at <= `--target_ms`
  single-query ms on this machine's cores).

Re-ranking side: for each `--local` entry IMAGESxFEATURES (IMAGES capped at --num), a
sharded DELG* store of IMAGES images with FEATURES binarised local descriptors each
(`descriptors_binary` uint8 [T, 16] packed bits of 128-D descriptors, `locations`,
`scores`, `scales`; the float `descriptors` dataset is declared but left unwritten
(HDF5 allocates no chunks for it: 1M x 100 x 128 float16 would be 26 GB more disk),
which the binary read path never touches). Per query, the local features of its 100
shortlisted images (the exact global top 100 of the first dimension, ids modulo
IMAGES) are read with `FeatureStore.local(i, binary=True)` as re-ranking does: ms per
query after evicting the files from the page cache (posix_fadvise DONTNEED, best
effort: "cold") and again ("warm"). The read cost of one image is a row range of
two datasets of one file, so it depends on FEATURES and on the page cache, not on
IMAGES (beyond the files' size relative to RAM).

Synthetic descriptors: `--clusters` centres c_j (default N / 1000) with entries
N(0, 1/D), a shared basis B of `--latent_dim` directions (entries N(0, 1/D)); a
descriptor is c_a + spread * z B / sqrt(latent_dim) + noise * e, z ~ N(0, I), e with
entries N(0, 1/D), L2-normalised (cluster structure with a low intrinsic dimension,
like real global descriptors); queries are drawn the same way (not in the database).
Rows are generated in fixed blocks seeded by (seed, dim, block), so a store does not
depend on memory settings; stores are kept in `--work_dir` and reused by later runs
with the same data flags (`--fresh` regenerates), index folders are deleted after
measuring unless `--keep_indexes`.

Disk at the default N = 1M: the 2048-D store 8.2 GB, the 128-D one 0.5 GB, local
stores 3.2 GB each (1Mx100 and 100kx1000), plus one index folder at a time (<= 8.6 GB).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KIB = 1024.0
MIB = 2.0**20
GEN_BLOCK = 32768  # rows generated per block (seeded per block).
EXACT_CHUNK = 65536  # database rows per exact-search step in the parent.
LOCAL_DIM = 128  # DELG local descriptors; packed into 16 bytes.
SHORTLIST = 100  # re-ranked images per query (paper).
IMAGE_SHAPE = (480, 640, 3)
STAMP = "dataset.json"
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "delg_tf_bench_index"
DEFAULT_LOCAL = "1000000x100,100000x1000"


# --------------------------------------------------------------------------
# Synthetic stores
# --------------------------------------------------------------------------


def _basis(seed, dim, clusters, latent_dim):
    rng = np.random.default_rng([seed, dim, 0])
    centers = rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)
    basis = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(dim)
    return centers, basis


def synthetic_rows(rng, count, centers, basis, spread, noise):
    """`count` L2-normalised descriptors (see the module docstring), float32."""
    dim = centers.shape[1]
    x = centers[rng.integers(0, len(centers), count)]
    z = rng.standard_normal((count, basis.shape[0]), dtype=np.float32)
    x += (spread / np.sqrt(basis.shape[0])) * (z @ basis)
    x += (noise / np.sqrt(dim)) * rng.standard_normal((count, dim), dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _shard_bounds(num, shards):
    edges = np.linspace(0, num, shards + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _shard_path(folder, k, shards):
    return folder / f"features-{k:05d}-of-{shards:05d}.h5"


def _names(start, end):
    return np.array([f"img_{i:07d}.jpg" for i in range(start, end)], dtype=object)


def _open_shard(path):
    """A new shard file in the store's file format (checksummed metadata)."""
    import h5py

    from delg_tf.extraction.store import HDF5_LIBVER

    return h5py.File(path, "w", libver=HDF5_LIBVER)


def _create(f, key, shape, dtype, data=None):
    """A dataset with the store's chunking and fletcher32 checksums."""
    from delg_tf.extraction.store import dataset_options

    return f.create_dataset(key, shape, dtype, data=data, **dataset_options(shape, dtype))


def _write_common(f, start, end, offsets):
    from delg_tf.extraction.store import FORMAT_VERSION, STRING_DTYPE, checksum_attributes

    names = _names(start, end)
    f.create_dataset("names", data=names, dtype=STRING_DTYPE)
    shapes = np.tile(np.int32(IMAGE_SHAPE), (end - start, 1))
    _create(f, "image_shapes", shapes.shape, shapes.dtype, shapes)
    _create(f, "local_offsets", offsets.shape, offsets.dtype, offsets)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs.update(checksum_attributes(names))


def _finish(tmp, path):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_global_store(folder, num, dim, shards, args):
    """The sharded store of `num` synthetic global descriptors of size `dim`."""
    from delg_tf.progress import progress_bar

    centers, basis = _basis(args.seed, dim, args.clusters, args.latent_dim)
    blocks = [(b, min(b + GEN_BLOCK, num)) for b in range(0, num, GEN_BLOCK)]
    bounds = _shard_bounds(num, shards)
    handles = []
    for k, (start, end) in enumerate(bounds):
        f = _open_shard(str(_shard_path(folder, k, shards)) + ".tmp")
        _write_common(f, start, end, np.zeros(end - start + 1, np.int64))
        _create(f, "global_descriptors", (end - start, dim), np.float32)
        for key, tail, dtype in (
            ("locations", (2,), np.float32),
            ("descriptors", (0,), np.float32),
            ("scores", (), np.float32),
            ("scales", (), np.float32),
        ):
            _create(f, key, (0,) + tail, dtype)
        f.attrs.update({"float16": False, "binarized": False, "local_dim": 0, "global_dim": dim})
        handles.append(f)
    for b, (start, end) in enumerate(progress_bar(blocks, f"bench: write {dim}-D store", "block")):
        rows = synthetic_rows(
            np.random.default_rng([args.seed, dim, 1, b]),
            end - start,
            centers,
            basis,
            args.spread,
            args.noise,
        )
        for k, (s0, s1) in enumerate(bounds):
            lo, hi = max(start, s0), min(end, s1)
            if lo < hi:
                handles[k]["global_descriptors"][lo - s0 : hi - s0] = rows[lo - start : hi - start]
    for k, f in enumerate(handles):
        f.close()
        path = _shard_path(folder, k, shards)
        _finish(str(path) + ".tmp", path)


def write_local_store(folder, images, features, shards, seed):
    """The sharded DELG* store: `features` binarised local descriptors per image."""
    from delg_tf.progress import progress_bar

    for k, (start, end) in enumerate(
        progress_bar(_shard_bounds(images, shards), "bench: write local store", "shard")
    ):
        n, rows = end - start, (end - start) * features
        tmp = str(_shard_path(folder, k, shards)) + ".tmp"
        with _open_shard(tmp) as f:
            _write_common(f, start, end, np.arange(n + 1, dtype=np.int64) * features)
            datasets = {
                "locations": _create(f, "locations", (rows, 2), np.float32),
                "descriptors_binary": _create(
                    f, "descriptors_binary", (rows, LOCAL_DIM // 8), np.uint8
                ),
                "scores": _create(f, "scores", (rows,), np.float32),
                "scales": _create(f, "scales", (rows,), np.float32),
            }
            # Declared, never written: HDF5 allocates no chunks (see the module docstring).
            _create(f, "descriptors", (rows, LOCAL_DIM), np.float16)
            f.attrs.update(
                {"float16": True, "binarized": True, "local_dim": LOCAL_DIM, "global_dim": 0}
            )
            step = max(1, GEN_BLOCK * 4 // max(features, 1)) * features
            for b, r0 in enumerate(range(0, rows, step)):
                r1 = min(r0 + step, rows)
                rng = np.random.default_rng([seed, k, b, 2])
                datasets["locations"][r0:r1] = rng.uniform(0, IMAGE_SHAPE[1], (r1 - r0, 2))
                datasets["descriptors_binary"][r0:r1] = rng.integers(
                    0, 256, (r1 - r0, LOCAL_DIM // 8), dtype=np.uint8
                )
                datasets["scores"][r0:r1] = rng.uniform(0, 2, r1 - r0)
                datasets["scales"][r0:r1] = rng.choice([0.25, 0.5, 1.0, 2.0], r1 - r0)
        _finish(tmp, _shard_path(folder, k, shards))


def ensure_store(folder, description, write, fresh):
    """Reuses `folder` if its stamp equals `description`, else (re)writes it."""
    stamp = folder / STAMP
    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == description:
        print(f"bench: reusing {folder}", file=sys.stderr)
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write()
    stamp.write_text(json.dumps(description))


def store_glob(folder, shards):
    return str(folder / f"features-*-of-{shards:05d}.h5")


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# --------------------------------------------------------------------------
# Exact ground truth (parent process)
# --------------------------------------------------------------------------


def exact_top_k(features, queries, k, chunk=EXACT_CHUNK):
    """Exact top-k ids of L2-normalised `queries` over the store, chunk by chunk."""
    from delg_tf.extraction.store import FeatureStore
    from delg_tf.retrieval import search

    best_s = np.zeros((len(queries), 0), np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    with FeatureStore(features) as store:
        for start in range(0, len(store), chunk):
            rows = store.global_rows(np.arange(start, min(start + chunk, len(store))))
            rows = search.l2_normalize(rows)
            ids, scores = search.exact_search(queries, rows, k)
            scores = np.concatenate([best_s, scores], axis=1)
            ids = np.concatenate([best_i, ids + start], axis=1)
            order = np.lexsort((ids, -scores), axis=1)[:, :k]
            best_s = np.take_along_axis(scores, order, axis=1)
            best_i = np.take_along_axis(ids, order, axis=1)
    return best_i


# --------------------------------------------------------------------------
# Workers (fresh subprocesses: their peak RSS is the method's)
# --------------------------------------------------------------------------


def _peak_rss_mib():
    """Peak RSS of this process: VmHWM of /proc/self/status on Linux (ru_maxrss there
    also counts the parent's RSS at fork: exec folds the old address space's peak into
    it), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * KIB / MIB  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB


def _set_threads(job):
    import faiss

    if job.get("threads"):
        faiss.omp_set_num_threads(int(job["threads"]))
    return faiss.omp_get_max_threads()


def worker_noop(job):
    import h5py  # noqa: F401 - the baseline imports what the other workers import.

    from delg_tf.retrieval import index  # noqa: F401

    return {"peak_rss_mib": _peak_rss_mib(), "threads": _set_threads(job)}


def worker_build(job):
    from delg_tf.retrieval import index as ix

    _set_threads(job)

    params = ix.IndexParams(**job["params"])
    start = time.perf_counter()
    built = ix.build(job["features"], params, progress=True)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    built.save(job["index_dir"], overwrite=True)
    return {
        "build_s": build_s,
        "save_s": time.perf_counter() - start,
        "peak_rss_mib": _peak_rss_mib(),
        "resolved": built.manifest["params"],
        "train_size": built.manifest["train_size"],
    }


def worker_search(job):
    from delg_tf.retrieval import index as ix

    _set_threads(job)

    queries = np.load(job["queries"])
    start = time.perf_counter()
    loaded = ix.load_index(job["index_dir"])
    load_s = time.perf_counter() - start
    results = []
    for setting in job["settings"]:
        loaded.set_search_params(**setting)
        loaded.search(queries[:1], job["k"])  # warm-up
        start = time.perf_counter()
        ids, _ = loaded.search(queries, job["k"])
        batch_s = time.perf_counter() - start
        single = []
        for q in queries[: job["single_queries"]]:
            start = time.perf_counter()
            loaded.search(q[None], job["k"])
            single.append(time.perf_counter() - start)
        path = f"{job['ids_prefix']}-{len(results)}.npy"
        np.save(path, ids)
        results.append(
            {
                "setting": setting,
                "batch_ms": 1e3 * batch_s / len(queries),
                "single_ms": 1e3 * statistics.mean(single),
                "single_p95_ms": 1e3 * float(np.percentile(single, 95)),
                "ids": path,
            }
        )
    return {"load_s": load_s, "peak_rss_mib": _peak_rss_mib(), "results": results}


WORKERS = {"noop": worker_noop, "build": worker_build, "search": worker_search}


def run_worker(kind, job, work_dir):
    """Runs `kind` in a fresh Python process; returns its JSON result (last stdout line)."""
    job_path = Path(work_dir) / f"job-{kind}.json"
    job_path.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", str(job_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(
            f"bench worker {kind} failed (exit {done.returncode}); job {job_path}: {job}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Settings and the benchmark
# --------------------------------------------------------------------------


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def build_settings(args):
    """[(method, build params, [search settings])] of the run."""
    out = []
    for method in args.methods.split(","):
        if method == "flat":
            out.append(("flat", {}, [{}]))
        elif method == "ivf_flat":
            out.append(
                ("ivf_flat", {"nlist": args.nlist}, [{"nprobe": n} for n in _ints(args.nprobes)])
            )
        elif method == "ivf_pq":
            out.append(
                (
                    "ivf_pq",
                    {"nlist": args.nlist, "pq_m": args.pq_m},
                    [{"nprobe": n} for n in _ints(args.pq_nprobes)],
                )
            )
        elif method == "hnsw":
            out.append(
                (
                    "hnsw",
                    {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction},
                    [{"ef_search": e} for e in _ints(args.ef_searches)],
                )
            )
        else:
            raise SystemExit(
                f"--methods: unknown {method!r}; expected flat, ivf_flat, ivf_pq, hnsw."
            )
    if out and out[0][0] != "flat":
        out.insert(0, ("flat", {}, [{}]))  # the reference of the ratios
    return out


SEARCH_PARAMS = ("nprobe", "ef_search")


def _describe(params, skip=()):
    return ",".join(f"{k}={v}" for k, v in params.items() if k not in skip) or "-"


def bench_dimension(dim, args, work_dir):
    """Rows of the table for one descriptor dimension, and the exact ids."""
    from delg_tf.retrieval import search

    folder = work_dir / f"global-d{dim}"
    data_flags = {
        "num": args.num,
        "dim": dim,
        "shards": args.shards,
        "seed": args.seed,
        "clusters": args.clusters,
        "latent_dim": args.latent_dim,
        "spread": args.spread,
        "noise": args.noise,
        "version": 2,  # 2: checksummed like the stores extract writes.
    }
    ensure_store(
        folder,
        data_flags,
        lambda: write_global_store(folder, args.num, dim, args.shards, args),
        args.fresh,
    )
    features = store_glob(folder, args.shards)
    centers, basis = _basis(args.seed, dim, args.clusters, args.latent_dim)
    queries = synthetic_rows(
        np.random.default_rng([args.seed, dim, 3]),
        args.num_queries,
        centers,
        basis,
        args.spread,
        args.noise,
    )
    queries_path = work_dir / f"queries-d{dim}.npy"
    np.save(queries_path, queries)
    start = time.perf_counter()
    exact = exact_top_k(features, queries, args.k)
    exact_s = time.perf_counter() - start
    print(
        f"bench: dim {dim}: store {folder_bytes(folder) / MIB:.0f} MiB; exact top-{args.k} "
        f"of {args.num_queries} queries with numpy over store chunks: {exact_s:.1f} s "
        f"({1e3 * exact_s / args.num_queries:.1f} ms/query)",
        file=sys.stderr,
    )
    rows = []
    for method, params, settings in build_settings(args):
        params = {k: v for k, v in params.items() if v is not None}
        index_dir = work_dir / f"index-d{dim}-{method}"
        built = run_worker(
            "build",
            {
                "features": features,
                "index_dir": str(index_dir),
                "params": dict(params, method=method),
                "threads": args.threads,
            },
            work_dir,
        )
        size = folder_bytes(index_dir)
        searched = run_worker(
            "search",
            {
                "index_dir": str(index_dir),
                "queries": str(queries_path),
                "k": args.k,
                "single_queries": min(args.single_queries, args.num_queries),
                "settings": settings,
                "ids_prefix": str(work_dir / f"ids-d{dim}-{method}"),
                "threads": args.threads,
            },
            work_dir,
        )
        for result in searched["results"]:
            ids = np.load(result["ids"])
            os.unlink(result["ids"])
            rows.append(
                {
                    "dim": dim,
                    "method": method,
                    "build": _describe(built["resolved"], SEARCH_PARAMS),
                    "search": _describe(result["setting"]),
                    "build_s": built["build_s"],
                    "save_s": built["save_s"],
                    "size_mib": size / MIB,
                    "build_rss": built["peak_rss_mib"],
                    "search_rss": searched["peak_rss_mib"],
                    "load_s": searched["load_s"],
                    "single_ms": result["single_ms"],
                    "single_p95_ms": result["single_p95_ms"],
                    "batch_ms": result["batch_ms"],
                    "recall": search.recall_at_k(ids, exact),
                }
            )
        if not args.keep_indexes:
            shutil.rmtree(index_dir, ignore_errors=True)
    return rows, exact


def print_table(rows, k, target_recall, target_ms):
    head = (
        f"  {'dim':>5s} {'method':8s} {'build params':34s} {'search':13s} {'build s':>8s} "
        f"{'save s':>7s} {'disk MiB':>9s} {'x flat':>6s} {'bRSS MiB':>9s} "
        f"{'sRSS MiB':>9s} {'1q ms':>8s} {'1q p95':>8s} {'batch ms':>9s} "
        f"{'x flat 1q':>9s} {'x flat b':>8s} {'recall@' + str(k):>10s}"
    )
    print(head)
    flats = {r["dim"]: r for r in rows if r["method"] == "flat"}
    for r in rows:
        flat = flats[r["dim"]]
        print(
            f"  {r['dim']:5d} {r['method']:8s} {r['build'][:34]:34s} {r['search'][:13]:13s} "
            f"{r['build_s']:8.1f} {r['save_s']:7.1f} {r['size_mib']:9.1f} "
            f"{r['size_mib'] / flat['size_mib']:6.2f} {r['build_rss']:9.0f} "
            f"{r['search_rss']:9.0f} {r['single_ms']:8.2f} {r['single_p95_ms']:8.2f} "
            f"{r['batch_ms']:9.3f} {flat['single_ms'] / r['single_ms']:9.1f} "
            f"{flat['batch_ms'] / r['batch_ms']:8.1f} {r['recall']:10.4f}"
        )
    for dim in sorted(flats, reverse=True):
        ok = [
            r
            for r in rows
            if r["dim"] == dim
            and r["method"] != "flat"
            and r["recall"] >= target_recall
            and r["single_ms"] <= target_ms
        ]
        if ok:
            best = min(ok, key=lambda r: r["single_ms"])
            print(
                f"  target dim {dim} (recall@{k} >= {target_recall} at <= {target_ms} ms "
                f"single-query): met by {best['method']} {best['build']} {best['search']} "
                f"(recall {best['recall']:.4f}, {best['single_ms']:.2f} ms/query single, "
                f"{best['batch_ms']:.3f} batched); {len(ok)} setting(s) meet it"
            )
        else:
            close = [r for r in rows if r["dim"] == dim and r["recall"] >= target_recall]
            best = min(close, key=lambda r: r["single_ms"]) if close else None
            hint = (
                f"; fastest with the recall: {best['method']} {best['search']} "
                f"{best['single_ms']:.2f} ms"
                if best
                else ""
            )
            print(
                f"  target dim {dim} (recall@{k} >= {target_recall} at <= {target_ms} ms "
                f"single-query): not met{hint}"
            )


def _evict(paths):
    """Drops `paths` from the page cache (best effort, no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_local(args, work_dir, exact_ids):
    """Lines of the re-ranking read benchmark (one per --local entry)."""
    from delg_tf.extraction.store import FeatureStore

    lines = []
    for entry in [e for e in args.local.split(",") if e]:
        images, features = (int(v) for v in entry.lower().split("x"))
        images = min(images, args.num)
        folder = work_dir / f"local-{images}x{features}"
        ensure_store(
            folder,
            {
                "images": images,
                "features": features,
                "shards": args.shards,
                "seed": args.seed,
                "version": 2,  # 2: checksummed like the stores extract writes.
            },
            lambda: write_local_store(folder, images, features, args.shards, args.seed),
            args.fresh,
        )
        shortlists = exact_ids[: args.local_queries, :SHORTLIST] % images
        files = sorted(folder.glob("features-*.h5"))
        _evict(files)
        start = time.perf_counter()
        store = FeatureStore(store_glob(folder, args.shards))
        open_s = time.perf_counter() - start
        timings = {}
        with store:
            for label in ("cold", "warm"):
                per_query, nbytes = [], 0
                for shortlist in shortlists:
                    start = time.perf_counter()
                    for i in shortlist:
                        locations, descriptors = store.local(int(i), binary=True)
                        nbytes += locations.nbytes + descriptors.nbytes
                    per_query.append(time.perf_counter() - start)
                timings[label] = (
                    1e3 * statistics.mean(per_query),
                    1e3 * float(np.percentile(per_query, 95)),
                    nbytes / len(shortlists),
                )
        size = folder_bytes(folder) / MIB
        lines.append(
            f"  local {images}x{features} ({args.shards} shards, {size:.0f} MiB, open "
            f"{open_s:.1f} s): top-{SHORTLIST} local features per query, "
            f"{timings['cold'][2] / KIB:.0f} KiB: cold {timings['cold'][0]:.2f} ms/query "
            f"(p95 {timings['cold'][1]:.2f}), warm {timings['warm'][0]:.2f} ms/query "
            f"(p95 {timings['warm'][1]:.2f}) over {len(shortlists)} queries"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--num", type=int, default=1_000_000, help="database descriptors N")
    parser.add_argument("--dims", default="2048,128", help="descriptor dimensions")
    parser.add_argument("--num_queries", type=int, default=1000)
    parser.add_argument(
        "--single_queries", type=int, default=100, help="queries also searched one at a time"
    )
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=None, help="default N / 1000")
    parser.add_argument("--latent_dim", type=int, default=16)
    parser.add_argument("--spread", type=float, default=0.6)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--methods", default="flat,ivf_flat,ivf_pq,hnsw")
    parser.add_argument("--nlist", type=int, default=None, help="default 4 sqrt(N)")
    parser.add_argument("--nprobes", default="8,16,32,64,128", help="ivf_flat settings")
    parser.add_argument("--pq_m", type=int, default=None, help="default 64 (or fewer)")
    parser.add_argument("--pq_nprobes", default="16,64", help="ivf_pq settings")
    parser.add_argument("--hnsw_m", type=int, default=32)
    parser.add_argument("--ef_construction", type=int, default=80)
    parser.add_argument("--ef_searches", default="128,256,512", help="hnsw settings")
    parser.add_argument(
        "--local",
        default=DEFAULT_LOCAL,
        help="re-ranking read stores, IMAGESxFEATURES,... ('' skips)",
    )
    parser.add_argument("--local_queries", type=int, default=100)
    parser.add_argument("--target_recall", type=float, default=0.95)
    parser.add_argument("--target_ms", type=float, default=10.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="faiss (OpenMP) threads of the workers; 0: faiss default, all "
        "cores (on a loaded machine, 1 avoids OpenMP contention)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=str(DEFAULT_WORK_DIR))
    parser.add_argument("--fresh", action="store_true", help="regenerate the stores")
    parser.add_argument("--keep_indexes", action="store_true")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.job).read_text()))
        print(json.dumps(result))
        return 0
    args.clusters = args.clusters or max(1, args.num // 1000)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dims = _ints(args.dims)
    baseline = run_worker("noop", {"threads": args.threads}, work_dir)
    started = time.perf_counter()
    print(
        f"bench/index.py: N={args.num} dims={dims} queries={args.num_queries} "
        f"(single {args.single_queries}) k={args.k} shards={args.shards} "
        f"clusters={args.clusters} latent_dim={args.latent_dim} spread={args.spread} "
        f"noise={args.noise} seed={args.seed}; cpus={os.cpu_count()}, faiss threads "
        f"{baseline['threads']}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; a worker process with "
        f"numpy/h5py/faiss imported peaks at {baseline['peak_rss_mib']:.0f} MiB RSS"
    )
    rows, first_exact = [], None
    for dim in dims:
        dim_rows, exact = bench_dimension(dim, args, work_dir)
        rows += dim_rows
        first_exact = exact if first_exact is None else first_exact
    print_table(rows, args.k, args.target_recall, args.target_ms)
    if args.local and first_exact is not None:
        for line in bench_local(args, work_dir, first_exact):
            print(line)
    print(f"  total {time.perf_counter() - started:.0f} s; stores kept in {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
