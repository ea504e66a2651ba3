"""Does RANSAC re-ranking help the demo model, and which matching choices matter?

    python bench/rerank_rules.py [--demo_output=demo_output] [--queries=unseen|all]

Reads a finished ``make demo`` output folder (its SavedModel, embedded data and
feature stores; with ``--queries=all`` the queries of the training landmarks are
extracted too, into ``DEMO_OUTPUT/features/all_queries``) and re-ranks the global
ranking with the paper's rule (inliers first, global similarity for ties) under
several matching variants, each at the demo's top-20 shortlist and over the whole
database:

* ``paper``: descriptor distance < 1.0, affine RANSAC, 20 px, 1000 iterations (App. B);
* ``residual_scaled``: the 20 px residual scaled to the image size (20 * 320 / 1024);
* ``mutual``: mutual nearest neighbours only;
* ``distinct``: inliers counted as distinct (query location, database location)
  pairs, min over both sides: a location kept at several pyramid scales, or a
  database keypoint matched by several query features, counts once;
* ``ratio``: Lowe's ratio test 0.8 instead of the distance threshold.

Prints mAP (revisitop Easy/Medium/Hard, percent) for the global ranking and each
variant, the share of query features that pass the descriptor threshold, and the
median RANSAC inliers of true pairs against the median / max of false pairs in
the shortlist: where false pairs reach as many inliers as true ones, "inliers
first" loses to the global ranking whatever the variant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

PAPER_IMAGE_SIZE = 1024  # Revisited Oxford/Paris images the 20 px were set for.
DEMO_SHORTLIST = 20
PROTOCOLS = ("easy", "medium", "hard")
VARIANTS = {
    "paper": {},
    "residual_scaled": {"residual_scale": True},
    "mutual": {"mutual": True},
    "distinct": {"distinct": True},
    "ratio": {"ratio": 0.8},
}


def count_inliers(
    query, db, image_size, residual_scale=False, mutual=False, distinct=False, ratio=None
):
    """(inliers, putative matches) of one pair under a matching variant."""
    from delg_tf.matching import colmap_ransac
    from delg_tf.matching import correspondences as corr
    from delg_tf.matching import defaults as paper

    q_idx, d_idx = corr.find_putative_matches(
        query.descriptors,
        db.descriptors,
        threshold=None if ratio else paper.DEFAULT_DESCRIPTOR_THRESHOLD,
        mutual=mutual,
        ratio=ratio,
    )
    residual = paper.DEFAULT_RANSAC_RESIDUAL_THRESHOLD * (
        image_size / PAPER_IMAGE_SIZE if residual_scale else 1.0
    )
    result = colmap_ransac.estimate_affine_ransac(
        db.keypoints[d_idx],
        query.keypoints[q_idx],
        residual_threshold=residual,
        iterations=paper.DEFAULT_RANSAC_ITERATIONS,
        seed=paper.DEFAULT_RANSAC_SEED,
    )
    if distinct and result.num_inliers:
        mask = result.inlier_mask
        num = min(
            len(np.unique(query.keypoints[q_idx][mask], axis=0)),
            len(np.unique(db.keypoints[d_idx][mask], axis=0)),
        )
        return num, q_idx.size
    return result.num_inliers, q_idx.size


def evaluate(ranks, gnd):
    from delg_tf.evaluation.revisitop import compute_map, protocol_gnd

    return [100.0 * float(compute_map(ranks, protocol_gnd(gnd, p)).mean_ap) for p in PROTOCOLS]


def load(demo_output: Path, which: str):
    from delg_tf import demo
    from delg_tf.data.embedded import load_transforms
    from delg_tf.data.revisitop import load_gnd
    from delg_tf.evaluation.pipeline import load_store_features

    config = demo.DemoConfig(output_dir=str(demo_output), progress=False)
    paths = demo.dataset_paths(config)
    if not (config.features_dir / "database" / "features.h5").is_file():
        sys.exit(
            f"error: --demo_output={demo_output} has no database features; run "
            f"`python -m delg_tf.demo --output_dir={demo_output}` first."
        )
    transforms = load_transforms(paths)
    gnd_all = load_gnd(paths.gnd, require_bbx=False)
    if which == "unseen":
        train_landmarks = demo.trained_landmarks(demo.train_configs(config)[0])
        gnd = demo.evaluation_subset(train_landmarks, gnd_all, transforms)
        stores = {
            "database": config.features_dir / "database" / "features.h5",
            "queries": config.features_dir / "queries" / "features.h5",
        }
    else:
        from delg_tf import extract as extract_entry

        gnd = gnd_all
        out = extract_entry.main(
            extract_entry.ExtractConfig(
                output_dir=str(config.features_dir / "all_queries"),
                model_path=str(config.export_path),
                progress=False,
            ),
            paths=demo.query_images(config, paths, gnd),
        )
        stores = {"database": config.features_dir / "database" / "features.h5", "queries": out}
    db_global, db_local = load_store_features(stores["database"], gnd["imlist"])
    q_global, q_local = load_store_features(stores["queries"], gnd["qimlist"])
    image_size = int(
        transforms.get("image_size", 0)
        or max(max(v["height"], v["width"]) for v in transforms["images"].values())
    )
    return gnd, db_global, db_local, q_global, q_local, image_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo_output", default="demo_output")
    parser.add_argument(
        "--queries",
        choices=("unseen", "all"),
        default="unseen",
        help="the demo's queries of unseen landmarks, or every query",
    )
    args = parser.parse_args(argv)
    gnd, db_global, db_local, q_global, q_local, image_size = load(
        Path(args.demo_output), args.queries
    )
    scores = q_global @ db_global.T
    ranks = np.argsort(-scores, axis=1, kind="stable")
    positives = [
        set(np.ravel(g["easy"]).tolist()) | set(np.ravel(g["hard"]).tolist()) for g in gnd["gnd"]
    ]
    num_db = db_global.shape[0]
    print(
        f"{len(q_local)} queries x {num_db} database images, images {image_size} px; "
        f"mAP in percent (Easy / Medium / Hard)"
    )
    header = (
        f"{'ranking':<26}{'shortlist':>10}"
        + "".join(f"{p:>8}" for p in PROTOCOLS)
        + f"{'passing':>9}{'true inl.':>11}{'false inl. med/max':>20}"
    )
    print(header)
    print("-" * len(header))
    glob_map = evaluate(ranks.T, gnd["gnd"])
    print(f"{'global only':<26}{'-':>10}" + "".join(f"{v:>8.2f}" for v in glob_map))
    for name, kwargs in VARIANTS.items():
        for k in (DEMO_SHORTLIST, num_db):
            reranked = ranks.copy()
            true_inl, false_inl, passing = [], [], []
            for q in range(len(q_local)):
                shortlist = ranks[q, :k]
                counted = [
                    count_inliers(q_local[q], db_local[j], image_size, **kwargs) for j in shortlist
                ]
                inliers = np.array([c[0] for c in counted])
                passing += [c[1] / max(len(q_local[q]), 1) for c in counted]
                for j, n in zip(shortlist, inliers):
                    (true_inl if j in positives[q] else false_inl).append(n)
                order = np.lexsort((-scores[q, shortlist], -inliers))
                reranked[q, :k] = shortlist[order]
            values = evaluate(reranked.T, gnd["gnd"])
            false_text = f"{np.median(false_inl):.0f}/{np.max(false_inl):.0f}" if false_inl else "-"
            print(
                f"{name:<26}{k:>10}"
                + "".join(f"{v:>8.2f}" for v in values)
                + f"{100 * np.mean(passing):>8.0f}%"
                + f"{np.median(true_inl) if true_inl else float('nan'):>11.0f}"
                + f"{false_text:>20}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
