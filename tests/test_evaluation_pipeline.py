"""Evaluation from features: global-only vs re-ranked, from arrays and from HDF5 stores."""

import json
import pickle

import numpy as np
import pytest

from delg_tf.configs import ConfigError
from delg_tf.evaluation import pipeline
from delg_tf.evaluation.config import EvaluateConfig, EvaluatePaths
from delg_tf.matching import synthetic as syn
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import MatchingConfig

NUM_DB, NUM_FEATURES, DIM_GLOBAL = 12, 150, 16


@pytest.fixture(scope="module")
def dataset():
    """2 queries; each has 2 easy positives that the global descriptor ranks last."""
    rng = np.random.default_rng(7)
    queries, q_global, gnd = [], [], []
    db_local = [None] * NUM_DB
    db_global = np.zeros((NUM_DB, DIM_GLOBAL), np.float32)
    positives = [[0, 1], [2, 3]]
    for q in range(2):
        query = syn.make_query(rng, NUM_FEATURES)
        g = syn.random_unit(rng, 1, DIM_GLOBAL)[0]
        for i in positives[q]:
            db_local[i] = syn.make_db_image(rng, query, 50, 20, NUM_FEATURES).features
            db_global[i] = -g  # globally the least similar
        queries.append(query)
        q_global.append(g)
        gnd.append(
            {"easy": np.array(positives[q]), "hard": np.array([], int), "junk": np.array([], int)}
        )
    for i in range(4, NUM_DB):
        db_local[i] = syn.make_db_image(rng, queries[i % 2], 0, 10, NUM_FEATURES).features
        db_global[i] = q_global[i % 2] + 0.3 * syn.random_unit(rng, 1, DIM_GLOBAL)[0]
    return db_global, np.stack(q_global), gnd, db_local, queries


def test_reranking_fixes_global_ranking(dataset, tmp_path):
    db_global, q_global, gnd, db_local, q_local = dataset
    config = EvaluateConfig(shortlist_size=NUM_DB, num_workers=2)
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
    assert out.results["global"]["easy"]["mAP"] < 50
    assert out.results["reranked"]["easy"]["mAP"] == pytest.approx(100.0)
    assert np.isnan(out.results["reranked"]["hard"]["mAP"])  # no hard positives anywhere
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["reranked"]["easy"]["mP@1"] == pytest.approx(100.0)
    assert saved["reranked"]["hard"]["mAP"] is None and saved["config"]["shortlist_size"] == NUM_DB


def test_shortlist_limits_reranking(dataset):
    db_global, q_global, gnd, db_local, q_local = dataset
    out = pipeline.evaluate_features(
        db_global, q_global, gnd, db_local, q_local, EvaluateConfig(shortlist_size=5), verbose=False
    )
    # positives are ranked last globally (outside the top 5): nothing changes.
    np.testing.assert_array_equal(out.reranked_ranks, out.global_ranks)


def test_feature_count_errors(dataset):
    db_global, q_global, gnd, db_local, q_local = dataset
    with pytest.raises(pipeline.FeatureInputError, match="num_queries=2"):
        pipeline.evaluate_features(db_global, q_global[:1], gnd, verbose=False)
    with pytest.raises(pipeline.FeatureInputError, match="refers to database image"):
        pipeline.evaluate_features(db_global[:2], q_global, gnd, verbose=False)
    with pytest.raises(pipeline.FeatureInputError, match="one LocalFeatures per image"):
        pipeline.evaluate_features(db_global, q_global, gnd, db_local[:3], q_local, verbose=False)


def test_cli_main_from_feature_stores(dataset, tmp_path):
    import h5py  # noqa: F401 - a requirement
    from delg_tf import evaluate
    from delg_tf.extraction.store import FeatureStoreWriter

    db_global, q_global, gnd, db_local, q_local = dataset

    def write(directory, names, globals_, locals_):
        with FeatureStoreWriter(directory) as writer:
            for name, g, f in zip(names, globals_, locals_):
                writer.add(
                    name + ".jpg",
                    {
                        "image_shape": (768, 1024, 3),
                        "global_descriptor": g,
                        "locations": f.keypoints,
                        "descriptors": f.descriptors,
                        "scores": np.ones(len(f), np.float32),
                        "scales": np.ones(len(f), np.float32),
                    },
                )

    imlist = [f"db_{i}" for i in range(NUM_DB)]
    qimlist = ["q_0", "q_1"]
    write(tmp_path / "db", imlist, db_global, db_local)
    write(tmp_path / "q", qimlist, q_global, q_local)
    gnd_path = tmp_path / "gnd_roxford5k.pkl"
    gnd_path.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    paths = EvaluatePaths(
        gnd_path=gnd_path,
        output_json=tmp_path / "out.json",
        db_features=tmp_path / "db",
        query_features=tmp_path / "q",
    )
    out = evaluate.main(EvaluateConfig(shortlist_size=NUM_DB), paths)
    res = json.loads(out.read_text())
    assert res["reranked"]["easy"]["mAP"] == pytest.approx(100.0)
    assert res["global"]["easy"]["mAP"] < 50


def test_paths_validation(tmp_path):
    with pytest.raises(ConfigError, match="both --db_features and --query_features"):
        EvaluatePaths(
            gnd_path=tmp_path / "g.pkl", output_json=tmp_path / "o.json", db_features=tmp_path
        )
    with pytest.raises(ConfigError, match="not both"):
        EvaluatePaths(
            gnd_path=tmp_path / "g.pkl",
            output_json=tmp_path / "o.json",
            ranks_path=tmp_path / "r.npy",
            scores_path=tmp_path / "s.npy",
        )
    with pytest.raises(ConfigError, match="--shortlist_size"):
        EvaluateConfig(shortlist_size=-1)


def test_config_record_is_flat_with_the_flag_keys():
    """results["config"] keeps the flat keys (= evaluate flags) it had before the nesting."""
    config = EvaluateConfig(
        shortlist_size=7,
        matching=MatchingConfig(
            ransac_iterations=3, use_ratio_test=True, binary_descriptors=True, seed=4
        ),
        num_workers=1,
    )
    assert config.record() == {
        "shortlist_size": 7,
        "descriptor_threshold": 1.0,
        "ransac_residual_threshold": 20.0,
        "ransac_iterations": 3,
        "min_inliers": 0,
        "use_ratio_test": True,
        "ratio_test_threshold": 0.8,
        "num_workers": 1,
        "seed": 4,
        "kappas": (1, 5, 10),
        "allow_truncated_ranks": False,
        "binary_descriptors": True,
        "search_method": "exact",
        "top_k": 0,
        "index_dir": "",
        "rerank": "ransac",
        "query_expansion": "none",
        "aqe_neighbours": 2,
        "aqe_alpha": 3.0,
        "dba": 0,
        "dba_alpha": 3.0,
        "superglobal_m": 400,
        "superglobal_k": 9,
        "superglobal_beta": 0.15,
        "diffusion_k": 50,
        "diffusion_query_k": 10,
        "diffusion_gamma": 3.0,
        "diffusion_alpha": 0.99,
        "diffusion_iterations": 20,
        "diffusion_tolerance": 1e-6,
    }
    mutual = EvaluateConfig(matching=MatchingConfig(mutual_nearest=True)).record()
    assert mutual["mutual_nearest"] is True
    with pytest.raises(ConfigError, match="MatchingConfig.min_inliers"):
        EvaluateConfig(matching=MatchingConfig(min_inliers=-1))
    with pytest.raises(ConfigError, match="EvaluateConfig.matching must be"):
        EvaluateConfig(matching={"ransac_iterations": 3})


def test_local_features_empty_image(dataset):
    db_global, q_global, gnd, db_local, q_local = dataset
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128), np.float32))
    locals_ = list(db_local)
    locals_[0] = empty
    out = pipeline.evaluate_features(
        db_global,
        q_global,
        gnd,
        locals_,
        q_local,
        EvaluateConfig(shortlist_size=NUM_DB),
        verbose=False,
    )
    assert out.reranked_ranks[0, 0] == 1  # the remaining positive moves to the top.
