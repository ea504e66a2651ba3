"""The "eval" preset of the embedded data: the default one with more queries and distractors.

Checked without building it (406 database images): its plan contains the default
preset's images with the same per-image seeds, so those render pixel for pixel the
same, and adding it left the existing presets' parameters (so their folders) unchanged.
"""

import numpy as np

from delg_tf.data import embedded
from delg_tf.training.config import EMBEDDED_PRESETS

# default_root() digests of the presets before "eval" was added (their cache folders).
EXISTING_PRESET_ROOTS = {
    "default": "embedded-default-d7ba8fb511",
    "tiny": "embedded-tiny-9f9fcbf9ea",
}


def test_existing_presets_unchanged_and_trainer_accepts_every_preset(monkeypatch):
    monkeypatch.setenv(embedded.ROOT_ENV_VAR, "/nonexistent")
    for preset, name in EXISTING_PRESET_ROOTS.items():
        assert embedded.default_root(preset).name == name
    assert set(EMBEDDED_PRESETS) == set(embedded.PRESETS)


def test_eval_preset_extends_the_default_one():
    default = embedded._resolve_params("default", {})
    params = embedded._resolve_params("eval", {})
    assert {
        k: v for k, v in params.items() if k not in ("num_queries", "num_views_per_distractor")
    } == {k: v for k, v in default.items() if k not in ("num_queries", "num_views_per_distractor")}
    plan = embedded.plan_images(params)
    counts = {split: sum(i["split"] == split for i in plan) for split in ("query", "database")}
    assert counts == {"query": 10 * 10, "database": 10 * 7 + 8 * 42}
    by_name = {item["name"]: item for item in plan}
    for item in embedded.plan_images(default):
        assert by_name[item["name"]] == item  # same photo, profile, role and k: same seed.


def test_a_shared_image_renders_identically():
    default = embedded._resolve_params("default", {})
    params = embedded._resolve_params("eval", {})
    item = next(i for i in embedded.plan_images(default) if i["role"] == "distractor")
    source = (np.arange(120 * 160 * 3) % 251).astype(np.uint8).reshape(120, 160, 3)
    a, meta_a = embedded.render_image(item, source, default)
    b, meta_b = embedded.render_image(item, source, params)
    np.testing.assert_array_equal(a, b)
    assert meta_a == meta_b
