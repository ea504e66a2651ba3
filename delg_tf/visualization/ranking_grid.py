"""PNG grid of a query's top-k before and after re-ranking (DELG paper Fig. 4b style).

The query is shown on the left; on the right one row with the global-feature
top-k and one with the top-k after local-feature re-ranking. When ground truth
is known, correct results get a green border and incorrect ones a red border
(junk images a grey border). matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from delg_tf.visualization.matches import import_pyplot, to_uint8_image

CORRECT_COLOR = (0, 200, 0)
INCORRECT_COLOR = (220, 0, 0)
JUNK_COLOR = (150, 150, 150)
BORDER_PX = 6
TILE_PX = 160
DEFAULT_TOP_K = 5
DPI = 100


def _tile(image, border_color) -> np.ndarray:
    """Resizes an image into a square tile (letterboxed) with an optional border."""
    from PIL import Image

    arr = to_uint8_image(image)
    inner = TILE_PX - 2 * BORDER_PX
    pil = Image.fromarray(arr)
    scale = inner / max(pil.size)  # fit the tile, up- or down-scaling.
    pil = pil.resize((max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale))))
    tile = np.full((TILE_PX, TILE_PX, 3), 255, dtype=np.uint8)
    if border_color is not None:
        tile[:] = border_color
        tile[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = 255
    small = np.asarray(pil)
    y0 = (TILE_PX - small.shape[0]) // 2
    x0 = (TILE_PX - small.shape[1]) // 2
    tile[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return tile


def _border(db_id, positives, junk):
    if positives is None:
        return None
    if junk is not None and db_id in junk:
        return JUNK_COLOR
    return CORRECT_COLOR if db_id in positives else INCORRECT_COLOR


def draw_ranking_grid(
    query_image,
    global_ranking: Sequence[int],
    reranked_ranking: Sequence[int],
    load_db_image: Callable[[int], object],
    output_path,
    top_k: int = DEFAULT_TOP_K,
    positives: Optional[Sequence[int]] = None,
    junk: Optional[Sequence[int]] = None,
    num_inliers: Optional[dict] = None,
) -> Path:
    """Writes the before/after re-ranking grid for one query.

    Args:
        query_image: the (cropped) query image.
        global_ranking: db ids ranked by global similarity.
        reranked_ranking: db ids after re-ranking.
        load_db_image: ``db_id -> image``.
        output_path: PNG path.
        top_k: results per row.
        positives: ground-truth positive db ids (borders drawn when given).
        junk: db ids to mark in grey.
        num_inliers: optional ``db_id -> inliers`` shown under re-ranked tiles.

    Returns:
        The PNG path.
    """
    plt = import_pyplot()
    pos = None if positives is None else set(int(i) for i in positives)
    jnk = None if junk is None else set(int(i) for i in junk)
    rows = [("global", list(global_ranking)[:top_k]), ("re-ranked", list(reranked_ranking)[:top_k])]
    fig, axes = plt.subplots(
        2,
        top_k + 1,
        figsize=((top_k + 1) * TILE_PX / DPI * 1.1, 2 * TILE_PX / DPI * 1.3),
        dpi=DPI,
        squeeze=False,
    )
    for r, (label, ids) in enumerate(rows):
        ax = axes[r, 0]
        ax.set_axis_off()
        if r == 0:
            ax.imshow(_tile(query_image, None))
            ax.set_title("query", fontsize=8)
        for c in range(top_k):
            ax = axes[r, c + 1]
            ax.set_axis_off()
            if c >= len(ids):
                continue
            db_id = int(ids[c])
            ax.imshow(_tile(load_db_image(db_id), _border(db_id, pos, jnk)))
            caption = f"{label} #{c + 1}: {db_id}"
            if num_inliers is not None and r == 1 and db_id in num_inliers:
                caption += f" ({num_inliers[db_id]} inl.)"
            ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=DPI)
    plt.close(fig)
    return output_path
