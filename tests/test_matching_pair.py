"""Verification of one pair (match_pair), its validated MatchingConfig, LocalFeatures,
the BLAS thread limit, and the imports of the matching room."""

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl

import delg_tf
from delg_tf.configs import ConfigError
from delg_tf.matching import defaults
from delg_tf.matching import synthetic as syn
from delg_tf.matching.features import LocalFeatures
from delg_tf.matching.pair import (
    MatchingConfig,
    limit_blas_threads,
    match_pair,
)

NUM_FEATURES = 300
PACKAGE = Path(delg_tf.__file__).parent
# The only delg_tf modules the matching room may import (besides its own).
MATCHING_MAY_IMPORT = ("delg_tf.matching", "delg_tf.extraction.binarize", "delg_tf.configs")


@pytest.fixture(scope="module")
def shortlist():
    rng = np.random.default_rng(3)
    return syn.make_shortlist(
        rng,
        shortlist_size=20,
        num_positives=3,
        num_features=NUM_FEATURES,
        positive_putatives_range=(60, 120),
        negative_putatives_range=(5, 20),
    )


def test_empty_features_score_zero(shortlist):
    query, pairs, _ = shortlist
    empty = LocalFeatures(np.zeros((0, 2)), np.zeros((0, 128), dtype=np.float32))
    assert match_pair(query, empty).num_inliers == 0
    assert match_pair(empty, pairs[0].features).num_inliers == 0
    assert match_pair(empty, empty).num_inliers == 0


def test_min_inliers_zeroes_weak_matches(shortlist):
    query, pairs, is_pos = shortlist
    neg = pairs[int(np.flatnonzero(~is_pos)[0])].features
    assert match_pair(query, neg, MatchingConfig(min_inliers=1000)).num_inliers == 0


def test_positive_pair_finds_its_true_correspondences(shortlist):
    query, pairs, is_pos = shortlist
    positive = pairs[int(np.flatnonzero(is_pos)[0])]
    result = match_pair(query, positive.features)
    true = len(positive.true_db_idx)
    assert true <= result.num_inliers <= true + 3
    assert result.model.shape == (2, 3)
    assert result.inlier_mask.sum() == result.num_inliers


def test_local_features_validation():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        LocalFeatures(np.zeros((4, 3)), np.zeros((4, 128)))
    with pytest.raises(ValueError, match="N = 4"):
        LocalFeatures(np.zeros((4, 2)), np.zeros((5, 128)))


def test_matching_config_defaults_are_the_papers():
    config = MatchingConfig()
    assert config.descriptor_threshold == defaults.DEFAULT_DESCRIPTOR_THRESHOLD == 1.0
    assert defaults.DEFAULT_BINARY_DESCRIPTOR_THRESHOLD == 1.1
    assert config.ransac_residual_threshold == defaults.DEFAULT_RANSAC_RESIDUAL_THRESHOLD == 20.0
    assert config.ransac_iterations == defaults.DEFAULT_RANSAC_ITERATIONS == 1000
    assert config.min_inliers == defaults.DEFAULT_MIN_INLIERS == 0


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("descriptor_threshold", 0.0, "a float > 0"),
        ("descriptor_threshold", -1.0, "a float > 0"),
        ("ransac_residual_threshold", 0.0, "a float > 0"),
        ("ransac_iterations", 0, "an integer >= 1"),
        ("min_inliers", -1, "an integer >= 0"),
        ("ratio_test_threshold", 0.0, "a float in (0, 1]"),
        ("ratio_test_threshold", 1.5, "a float in (0, 1]"),
    ],
)
def test_matching_config_refuses_out_of_range(field, value, expected):
    with pytest.raises(ConfigError) as info:
        MatchingConfig(**{field: value})
    message = str(info.value)
    assert f"MatchingConfig.{field}" in message and expected in message
    assert repr(value) in message and "\n" not in message
    assert (info.value.field, info.value.expected, info.value.received) == (field, expected, value)
    assert isinstance(info.value, ValueError)
    # The boundary values themselves are accepted.
    MatchingConfig(ransac_iterations=1, min_inliers=0, ratio_test_threshold=1.0)


def test_limit_blas_threads_limits_and_restores():
    def blas_threads():
        return [
            m["num_threads"] for m in threadpoolctl.threadpool_info() if m["user_api"] == "blas"
        ]

    before = blas_threads()
    assert before, "numpy's BLAS should be visible to threadpoolctl"
    with limit_blas_threads(1):
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_matching_imports_only_lower_rooms():
    offending = {
        f"{path.name}: {module}"
        for path in sorted((PACKAGE / "matching").glob("*.py"))
        for module in _imported_modules(path)
        if module.startswith("delg_tf") and not module.startswith(MATCHING_MAY_IMPORT)
    }
    assert not offending, f"delg_tf/matching imports rooms above it: {sorted(offending)}"


def test_no_ctypes_in_the_package():
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "ctypes" in set(_imported_modules(path))
    )
    assert not users, f"BLAS threads go through threadpoolctl; ctypes imported by {users}"


def test_matching_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MatchingConfig().seed = 1
