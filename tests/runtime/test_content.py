"""Segment and generate checked on content, not shapes: the shipped checkpoint's referring masks
against the scene's object masks, its generated images against the colour their caption names."""

import numpy as np

from setok.data.items import eval_items
from setok.data.scenes import COLORS
from setok.eval.metrics import iou


def test_segment_masks_overlap_the_referred_object(shipped):
    ious, shuffled = [], []
    items = eval_items(30, seed=61)
    for i, it in enumerate(items):
        expression, mask = it.referring[0]
        got = shipped.segment(it.image, expression).mask
        ious.append(iou(got, mask))
        shuffled.append(iou(got, items[(i + 1) % len(items)].referring[0][1]))  # another scene's object
    assert np.mean(ious) >= 0.8, np.mean(ious)
    assert np.mean(shuffled) < 0.3, np.mean(shuffled)  # the check can fail: a wrong mask scores low


def _nearest(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda n: np.linalg.norm(rgb - np.asarray(COLORS[n], float)))


def test_generated_images_show_the_object_colour_of_their_caption(shipped):
    """Single-object captions: the generated pixels farthest from the image's median colour (the
    object, whatever its placement) are nearest the caption's colour among the 8 object colours
    (chance: 1 in 8)."""
    singles = [it for it in eval_items(300, seed=11) if it.num_objects == 1][:20]
    hits = 0
    for it in singles:
        g = shipped.generate_image(it.caption)
        assert g.image.shape == (64, 64, 3) and 1 <= g.num_tokens <= shipped.max_tokens
        px = g.image.reshape(-1, 3).astype(float)
        far = np.linalg.norm(px - np.median(px, 0), axis=1)
        hits += _nearest(px[far >= np.quantile(far, 0.9)].mean(0)) == it.concepts[0].split()[1]
    assert hits >= 10, f"{hits} of {len(singles)} generated objects have their caption's colour"
