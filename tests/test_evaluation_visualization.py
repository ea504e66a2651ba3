"""Match and ranking-grid PNGs are written and have the expected layout."""

import numpy as np
import pytest

import matplotlib  # noqa: F401,E402 - in .[all] (the plots extra)

from delg_tf.matching import synthetic as syn  # noqa: E402
from delg_tf.matching.pair import match_pair  # noqa: E402
from delg_tf.visualization import matches, ranking_grid  # noqa: E402


def test_draw_pair_match_png(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    query = syn.make_query(rng, num_features=200, image_size=(120.0, 160.0))
    db = syn.make_db_image(
        rng, query, num_true=40, num_false=20, num_features=200, image_size=(120.0, 160.0)
    )
    pair = match_pair(query, db.features)
    q_img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    d_img = rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)
    out = matches.draw_pair_match(q_img, d_img, query, db.features, pair, tmp_path / "m.png")
    with Image.open(out) as im:
        assert im.size == (310, 120)
    with pytest.raises(ValueError, match="keypoint_order"):
        matches.draw_matches(
            q_img,
            d_img,
            np.zeros((1, 2)),
            np.zeros((1, 2)),
            tmp_path / "x.png",
            keypoint_order="rc",
        )


def test_ranking_grid_png(tmp_path):
    from PIL import Image

    imgs = {i: np.full((40, 60, 3), 20 * i, dtype=np.uint8) for i in range(6)}
    out = ranking_grid.draw_ranking_grid(
        imgs[0],
        [1, 2, 3, 4],
        [3, 1, 2, 4],
        imgs.__getitem__,
        tmp_path / "grid.png",
        top_k=3,
        positives=[3],
        junk=[4],
        num_inliers={3: 50, 1: 0, 2: 0},
    )
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 0
    tile = ranking_grid._tile(imgs[1], ranking_grid.CORRECT_COLOR)
    assert tuple(tile[0, 0]) == ranking_grid.CORRECT_COLOR
