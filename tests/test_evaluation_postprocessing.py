"""Post-processing in evaluation: DBA, alphaQE, SuperGlobal, diffusion, RANSAC and their order.

Every `--rerank` / `--query_expansion` / `--dba` option of `evaluate_features` gives the
ranking of the retrieval functions called directly (the oracle); the flags parse into
`EvaluateConfig`, bad values stop with one `error:` line; the results JSON records the
stages that ran, their parameters and ms/query; feature stores and end to end use it.
"""

import dataclasses
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from delg_tf.configs import ConfigError
from delg_tf.evaluation import pipeline
from delg_tf.evaluation.config import EvaluateConfig, EvaluatePaths
from delg_tf.evaluation.revisitop import evaluate_revisitop
from delg_tf.matching import synthetic as syn
from delg_tf.matching.pair import MatchingConfig
from delg_tf.retrieval import diffusion
from delg_tf.retrieval import query_expansion as qe
from delg_tf.retrieval import significance
from delg_tf.retrieval import superglobal as sg
from delg_tf.retrieval.rerank import Reranker, rerank_order
from delg_tf.retrieval.search import full_ranking, l2_normalize

NUM_CLASSES, PER_CLASS, NUM_DISTRACTORS = 6, 5, 10
DIM_GLOBAL, DIM_LOCAL, NUM_FEATURES = 16, 32, 120
IMAGE_SIZE = (240.0, 320.0)
# Small settings so that every stage truncates (M < N, shortlist < M) and runs fast.
FAST = EvaluateConfig(
    shortlist_size=10,
    matching=MatchingConfig(ransac_iterations=100),
    num_workers=2,
    aqe_neighbours=3,
    superglobal_m=25,
    superglobal_k=4,
    diffusion_k=8,
    diffusion_query_k=5,
)


@pytest.fixture(scope="module")
def data():
    """6 landmarks x 5 database views + 10 distractors; one query per landmark.

    Global descriptors: noisy copies of a landmark centre (positives are not all on
    top); local features: positives share 4-30 affine-consistent matches with the
    query, every image has false putative matches.
    """
    rng = np.random.default_rng(3)
    centres = syn.random_unit(rng, NUM_CLASSES, DIM_GLOBAL)
    queries = [syn.make_query(rng, NUM_FEATURES, DIM_LOCAL, IMAGE_SIZE) for _ in range(NUM_CLASSES)]
    q_global = centres + 0.5 * syn.random_unit(rng, NUM_CLASSES, DIM_GLOBAL)
    db_global, db_local, gnd = [], [], []
    for c in range(NUM_CLASSES):
        ids = list(range(len(db_global), len(db_global) + PER_CLASS))
        for _ in range(PER_CLASS):
            db_global.append(centres[c] + 0.8 * syn.random_unit(rng, 1, DIM_GLOBAL)[0])
            db_local.append(
                syn.make_db_image(
                    rng, queries[c], int(rng.integers(4, 30)), 15, NUM_FEATURES, IMAGE_SIZE
                ).features
            )
        gnd.append(
            {"easy": np.array(ids[:3]), "hard": np.array(ids[3:]), "junk": np.array([], np.int64)}
        )
    for _ in range(NUM_DISTRACTORS):
        near = int(rng.integers(NUM_CLASSES))
        db_global.append(centres[near] + 0.9 * syn.random_unit(rng, 1, DIM_GLOBAL)[0])
        db_local.append(
            syn.make_db_image(rng, queries[near], 0, 20, NUM_FEATURES, IMAGE_SIZE).features
        )
    return (
        np.asarray(db_global, np.float32),
        np.asarray(q_global, np.float32),
        gnd,
        db_local,
        queries,
    )


def _expanded(config, db, q):
    """The oracle's global ranking after DBA / alphaQE, by the query_expansion functions."""
    if config.dba == 0 and config.query_expansion == "none":
        ranks, by_id = full_ranking(q, db)
        return ranks, by_id, db, q
    if config.dba_alpha == config.aqe_alpha:
        n = config.aqe_neighbours if config.query_expansion == "aqe" else 0
        ranks, by_id = qe.expanded_ranking(q, db, n, config.dba, config.aqe_alpha)
        db = qe.database_augmentation(db, config.dba, config.dba_alpha)
        q = qe.alpha_query_expansion(q, db, n, config.aqe_alpha)
        return ranks, by_id, db, q
    db = qe.database_augmentation(db, config.dba, config.dba_alpha)
    if config.query_expansion == "aqe":
        q = qe.alpha_query_expansion(q, db, config.aqe_neighbours, config.aqe_alpha)
    by_id = db @ q.T
    return qe.ranking_from_scores(by_id), by_id, db, q


def oracle(config, data):
    """The final ranking of `config`, from the retrieval functions called directly."""
    db_global, q_global, _, db_local, q_local = data
    ranks, by_id, db, q = _expanded(config, l2_normalize(db_global), l2_normalize(q_global))
    reranker = Reranker(config.matching, config.shortlist_size, config.num_workers)
    with reranker:
        if config.rerank == "none":
            return ranks
        if config.rerank == "ransac":
            return reranker.rerank_all(ranks, q_local, db_local, scores=by_id)
        if config.rerank in ("superglobal", "superglobal+ransac"):
            ranks, _ = sg.superglobal_rerank(
                q,
                db,
                config.superglobal_m,
                config.superglobal_k,
                config.superglobal_beta,
                ranks=ranks,
            )
            if config.rerank == "superglobal":
                return ranks
            return reranker.rerank_all(ranks, q_local, db_local)  # ties: SuperGlobal order.
        if config.rerank == "diffusion":
            return diffusion.diffusion_ranking(
                q,
                db,
                graph_neighbors=config.diffusion_k,
                query_neighbors=config.diffusion_query_k,
                gamma=config.diffusion_gamma,
                alpha=config.diffusion_alpha,
                tolerance=config.diffusion_tolerance,
                max_iterations=config.diffusion_iterations,
            )[0]
        assert config.rerank == "ransac_fused"
        out = ranks.copy()
        for col in range(ranks.shape[1]):
            shortlist = ranks[: config.shortlist_size, col]
            inliers, putative = reranker.count_matches(q_local[col], db_local, shortlist)
            p = significance.chance_inlier_probability(
                q_local[col].keypoints, config.matching.ransac_residual_threshold
            )
            kept = significance.significant_inliers(inliers, putative, p)
            out[: len(shortlist), col] = shortlist[rerank_order(kept, by_id[shortlist, col])]
        return out


OPTIONS = {
    "none": dict(rerank="none"),
    "ransac": dict(),
    "aqe": dict(rerank="none", query_expansion="aqe"),
    "dba": dict(rerank="none", dba=3),
    "dba+aqe": dict(rerank="none", dba=3, query_expansion="aqe"),
    "dba+aqe, other alphas": dict(
        rerank="none", dba=2, dba_alpha=1.0, query_expansion="aqe", aqe_alpha=0.0
    ),
    "superglobal": dict(rerank="superglobal"),
    "dba+aqe+superglobal": dict(rerank="superglobal", dba=3, query_expansion="aqe"),
    "superglobal+ransac": dict(rerank="superglobal+ransac"),
    "diffusion": dict(rerank="diffusion"),
    "aqe+diffusion": dict(rerank="diffusion", query_expansion="aqe"),
    "ransac_fused": dict(rerank="ransac_fused"),
    "dba+ransac": dict(dba=3),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_equals_the_retrieval_functions(data, name):
    config = dataclasses.replace(FAST, **OPTIONS[name])
    db_global, q_global, gnd, db_local, q_local = data
    out = pipeline.evaluate_features(
        db_global, q_global, gnd, db_local, q_local, config, verbose=False
    )
    final = out.global_ranks if out.reranked_ranks is None else out.reranked_ranks
    if out.reranked_ranks is None and out.expanded_ranks is not None:
        final = out.expanded_ranks
    np.testing.assert_array_equal(final, oracle(config, data))
    assert ("reranked" in out.results) == (config.rerank != "none")
    assert ("expanded" in out.results) == (config.dba > 0 or config.query_expansion == "aqe")
    np.testing.assert_array_equal(  # the "global" row is always the plain search.
        out.global_ranks, full_ranking(l2_normalize(q_global), l2_normalize(db_global))[0]
    )


def test_fused_rule_keeps_the_global_order_where_inliers_are_not_significant(data):
    db_global, q_global, gnd, db_local, q_local = data
    fused = pipeline.evaluate_features(
        db_global,
        q_global,
        gnd,
        db_local,
        q_local,
        dataclasses.replace(FAST, rerank="ransac_fused"),
        verbose=False,
    )
    plain = pipeline.evaluate_features(
        db_global, q_global, gnd, db_local, q_local, FAST, verbose=False
    )
    assert not np.array_equal(fused.reranked_ranks, plain.reranked_ranks)
    for col in range(len(gnd)):
        shortlist = fused.global_ranks[: FAST.shortlist_size, col]
        with Reranker(FAST.matching, FAST.shortlist_size, 1) as reranker:
            inliers, putative = reranker.count_matches(q_local[col], db_local, shortlist)
        p = significance.chance_inlier_probability(q_local[col].keypoints, 20.0)
        kept = significance.significant_inliers(inliers, putative, p)
        assert (kept <= inliers).all() and ((kept == 0) | (kept == inliers)).all()
        quiet = shortlist[kept == 0]
        reranked = list(fused.reranked_ranks[: FAST.shortlist_size, col])
        positions = [reranked.index(i) for i in quiet]
        assert positions == sorted(positions)  # not significant: global order, after the rest.
        assert all(p >= int(np.count_nonzero(kept)) for p in positions)


def test_json_records_stages_parameters_and_timings(data, tmp_path):
    db_global, q_global, gnd, db_local, q_local = data
    config = dataclasses.replace(FAST, rerank="superglobal+ransac", dba=3, query_expansion="aqe")
    out = pipeline.evaluate_features(
        db_global,
        q_global,
        gnd,
        db_local,
        q_local,
        config,
        output_json=tmp_path / "r.json",
        verbose=False,
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {"global", "expanded", "superglobal", "reranked"} <= set(saved)
    post = saved["postprocessing"]
    assert post["dba"] == {"neighbours": 3, "alpha": 3.0}
    assert post["query_expansion"] == {"method": "aqe", "neighbours": 3, "alpha": 3.0}
    assert post["rerank"] == {
        "method": "superglobal+ransac",
        "superglobal": {"m": 25, "k": 4, "beta": 0.15},
        "ransac": {"shortlist_size": 10, "significant_only": False},
    }
    stages = post["stages"]
    assert [s["stage"] for s in stages] == [
        "search",
        "dba",
        "aqe",
        "search_expanded",
        "superglobal_graph",
        "superglobal",
        "ransac",
    ]
    for stage in stages:
        assert stage["seconds"] >= 0
        assert stage["ms_per_query"] == pytest.approx(1000 * stage["seconds"] / len(gnd))
        assert stage["offline"] == (stage["stage"] in ("dba", "superglobal_graph"))
        assert saved["timings"][stage["stage"] + "_s"] == pytest.approx(stage["seconds"])
    assert saved["timings"]["rerank_s"] == pytest.approx(
        saved["timings"]["superglobal_graph_s"]
        + saved["timings"]["superglobal_s"]
        + saved["timings"]["ransac_s"]
    )
    assert post["skipped"] == []
    assert saved["config"]["rerank"] == "superglobal+ransac"
    assert out.postprocessing == post

    diffusion_run = pipeline.evaluate_features(
        db_global,
        q_global,
        gnd,
        config=dataclasses.replace(FAST, rerank="diffusion"),
        verbose=False,
    )
    names = [s["stage"] for s in diffusion_run.postprocessing["stages"]]
    assert names == ["search", "diffusion_graph", "diffusion"]
    assert diffusion_run.postprocessing["rerank"]["diffusion"] == {
        "graph_neighbours": 8,
        "query_neighbours": 5,
        "gamma": 3.0,
        "alpha": 0.99,
        "iterations": 20,
        "tolerance": 1e-6,
    }
    # RANSAC asked for without local features: the global ranking, and said so.
    skipped = pipeline.evaluate_features(db_global, q_global, gnd, config=FAST, verbose=False)
    assert skipped.reranked_ranks is None and "reranked" not in skipped.results
    assert "no local features" in skipped.postprocessing["skipped"][0]


def test_images_without_descriptors_do_not_stop_postprocessing(data):
    db_global, q_global, gnd, db_local, q_local = data
    db_global = db_global.copy()
    db_global[7] = 0.0  # a failed extraction (allow_missing stores give zero rows).
    for rerank in ("superglobal", "diffusion"):
        config = dataclasses.replace(FAST, rerank=rerank, dba=3, query_expansion="aqe")
        out = pipeline.evaluate_features(db_global, q_global, gnd, config=config, verbose=False)
        assert sorted(out.reranked_ranks[:, 0]) == list(range(len(db_global)))
    assert (out.reranked_ranks[-1] == 7).all()  # diffusion: not a graph node, last.


def _write_store(directory, names, globals_, locals_):
    from delg_tf.extraction.store import FeatureStoreWriter

    with FeatureStoreWriter(directory) as writer:
        for name, g, f in zip(names, globals_, locals_):
            writer.add(
                name + ".jpg",
                {
                    "image_shape": (240, 320, 3),
                    "global_descriptor": g,
                    "locations": f.keypoints,
                    "descriptors": f.descriptors,
                    "scores": np.ones(len(f), np.float32),
                    "scales": np.ones(len(f), np.float32),
                },
            )


def test_stores_and_end_to_end_use_the_postprocessing(data, tmp_path):
    pytest.importorskip("h5py")
    from delg_tf import evaluate
    from delg_tf.evaluation.end_to_end import DatasetEvalConfig, evaluate_dataset

    db_global, q_global, gnd, db_local, q_local = data
    imlist = [f"db_{i}" for i in range(len(db_global))]
    qimlist = [f"q_{i}" for i in range(len(q_global))]
    _write_store(tmp_path / "db", imlist, db_global, db_local)
    _write_store(tmp_path / "q", qimlist, q_global, q_local)
    gnd_cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    config = dataclasses.replace(FAST, rerank="superglobal+ransac", query_expansion="aqe")
    db_stored, db_local_stored = pipeline.load_store_features(tmp_path / "db", imlist)
    q_stored, q_local_stored = pipeline.load_store_features(tmp_path / "q", qimlist)
    stored = (db_stored, q_stored, gnd, db_local_stored, q_local_stored)
    expected = evaluate_revisitop(oracle(config, stored), gnd, FAST.kappas)

    gnd_path = tmp_path / "gnd_roxford5k.pkl"
    gnd_path.write_bytes(pickle.dumps(gnd_cfg))
    out = evaluate.main(
        config,
        EvaluatePaths(
            gnd_path=gnd_path,
            output_json=tmp_path / "stores.json",
            db_features=tmp_path / "db",
            query_features=tmp_path / "q",
        ),
    )
    saved = json.loads(out.read_text())
    assert saved["postprocessing"]["rerank"]["method"] == "superglobal+ransac"
    assert saved["reranked"] == expected

    embedded = tmp_path / "embedded"
    embedded.mkdir()
    boxed = [{**g, "bbx": np.array([0.0, 0.0, 320.0, 240.0])} for g in gnd]
    (embedded / "gnd_embedded.pkl").write_bytes(pickle.dumps({**gnd_cfg, "gnd": boxed}))
    results = evaluate_dataset(
        DatasetEvalConfig(
            output_json=str(tmp_path / "e2e.json"),
            dataset_dir=str(embedded),
            db_features=str(tmp_path / "db"),
            query_features=str(tmp_path / "q"),
            evaluate=config,
            progress=False,
            verbose=False,
        )
    )
    assert results["reranked"] == saved["reranked"]
    assert [s["stage"] for s in results["postprocessing"]["stages"]] == [
        "search",
        "aqe",
        "search_expanded",
        "superglobal_graph",
        "superglobal",
        "ransac",
    ]


FLAG_VALUES = {
    "rerank": "superglobal+ransac",
    "query_expansion": "aqe",
    "aqe_neighbours": 5,
    "aqe_alpha": 2.5,
    "dba": 4,
    "dba_alpha": 1.0,
    "superglobal_m": 300,
    "superglobal_k": 7,
    "superglobal_beta": 0.2,
    "diffusion_k": 30,
    "diffusion_query_k": 6,
    "diffusion_gamma": 2.0,
    "diffusion_alpha": 0.9,
    "diffusion_iterations": 15,
    "diffusion_tolerance": 1e-5,
}


def test_flags_parse_into_the_config():
    from absl import flags

    from delg_tf import cli as runner
    from delg_tf import evaluate

    values = flags.FlagValues()
    runner.define_config_flags(EvaluatePaths, values)
    runner.define_config_flags(EvaluateConfig, values, skip=evaluate.EVALUATE_NESTED)
    runner.define_config_flags(MatchingConfig, values, skip=evaluate.MATCHING_WITHOUT_FLAG)
    values(
        [
            "evaluate",
            "--gnd_path=g.pkl",
            "--db_features=db.h5",
            "--query_features=q.h5",
            "--output_json=o.json",
            *(f"--{k}={v}" for k, v in FLAG_VALUES.items()),
        ]
    )
    config, paths = evaluate._config_from_flags(values)
    assert {k: getattr(config, k) for k in FLAG_VALUES} == FLAG_VALUES
    assert paths.mode == "features"
    defaults = EvaluateConfig()
    assert (defaults.rerank, defaults.query_expansion, defaults.dba) == ("ransac", "none", 0)
    assert (defaults.superglobal_m, defaults.superglobal_k, defaults.superglobal_beta) == (
        400,
        9,
        0.15,
    )
    assert (defaults.aqe_alpha, defaults.dba_alpha) == (3.0, 3.0)
    assert (
        defaults.diffusion_k,
        defaults.diffusion_query_k,
        defaults.diffusion_gamma,
        defaults.diffusion_alpha,
    ) == (50, 10, 3.0, 0.99)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rerank="magic"), "--rerank must be one of none, ransac, superglobal"),
        (dict(query_expansion="dqe"), "--query_expansion must be one of none, aqe"),
        (dict(aqe_neighbours=0), "--aqe_neighbours must be an integer >= 1"),
        (dict(dba=-1), "--dba must be an integer >= 0"),
        (dict(superglobal_beta=-0.1), "--superglobal_beta must be a float >= 0"),
        (dict(superglobal_m=0), "--superglobal_m must be an integer >= 1"),
        (dict(diffusion_alpha=1.0), r"--diffusion_alpha must be a float in \[0, 1\)"),
        (dict(diffusion_k=1), "--diffusion_k must be an integer >= 2"),
        (dict(rerank="diffusion", top_k=500), "--top_k must be 0 with --rerank=diffusion"),
        (dict(rerank="superglobal", top_k=200), "--top_k must be 0 .* >= --superglobal_m=400"),
        (dict(rerank="superglobal+ransac", superglobal_m=50), "--shortlist_size must be <= "),
    ],
)
def test_bad_values_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**kwargs)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--rerank=magic", "error: --rerank must be one of none, ransac, superglobal"),
        ("--aqe_alpha=abc", "error: flag --aqe_alpha=abc: could not convert string to float"),
    ],
)
def test_bad_flags_are_one_error_line(tmp_path, flag, message):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "delg_tf.evaluate",
            f"--gnd_path={tmp_path / 'g.pkl'}",
            "--db_features=db.h5",
            "--query_features=q.h5",
            f"--output_json={tmp_path / 'o.json'}",
            flag,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
