"""Token masks at pixel resolution: numpy only, shared by the runtime and the evaluation."""

import numpy as np
import torch

from setok.data.items import eval_items
from setok.eval.metrics import iou
from setok.model.losses import patch_labels
from setok.runtime.masks import pixel_owners, token_masks


def _instance_clusters(it):
    """Perfect clusters: one token per instance (and one for the background), at patch level."""
    labels = patch_labels(torch.from_numpy(it.instance_mask)[None], 4)[0].numpy()  # (N,)
    _, assignment = np.unique(labels, return_inverse=True)
    return labels, assignment


def test_pixel_masks_follow_object_borders_inside_patches():
    fine, coarse = [], []
    for it in eval_items(30, seed=4):
        labels, assignment = _instance_clusters(it)
        k = int(assignment.max()) + 1
        owners = pixel_owners(assignment, it.image, 16, 4, k)
        masks = token_masks(owners, k)
        assert masks.shape == (k, 64, 64) and np.all(masks.sum(0) == 1)  # each pixel owned once
        ids = np.unique(labels)
        for t, inst in enumerate(ids):
            if inst == 0:
                continue
            patch_mask = np.kron((assignment == t).reshape(16, 16), np.ones((4, 4), bool))
            fine.append(iou(masks[t], it.instance_mask == inst))
            coarse.append(iou(patch_mask, it.instance_mask == inst))
    assert np.mean(fine) > 0.9 > np.mean(coarse) + 0.1, (np.mean(fine), np.mean(coarse))


def test_a_pixel_only_moves_to_a_cluster_next_to_its_patch():
    rng = np.random.default_rng(0)
    assignment = np.zeros(16, np.int64)
    assignment[15] = 1  # one patch in the corner of a 4x4 grid
    pixels = np.zeros((16, 16, 3))
    pixels[:4, :4] = 1.0  # far corner looks like cluster 1's colour...
    pixels[12:, 12:] = 1.0 + 0.01 * rng.standard_normal((4, 4, 3))
    owners = pixel_owners(assignment, pixels, 4, 4, 2)
    assert np.all(owners[:4, :4] == 0)  # ...but cluster 1 is not in its neighbourhood
    assert np.all(owners[12:, 12:] == 1)


def _owners_by_definition(assignment, pixels, grid, patch, k):
    """The definition, over all K tokens at once: the nearest mean colour among the tokens owning a
    patch in the pixel's 3x3 patch neighbourhood; ties to the lower token index."""
    member = assignment.reshape(grid, grid)[None] == np.arange(k)[:, None, None]  # (K, G, G)
    up = np.ones((1, patch, patch), bool)
    owned = np.kron(member, up)  # (K, H, W)
    x = pixels.astype(np.float64)
    means = np.einsum("khw,hwc->kc", owned, x) / np.maximum(owned.sum((1, 2)), 1)[:, None]
    pad = np.pad(member, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros_like(member)
    for dy in range(3):
        for dx in range(3):
            near |= pad[:, dy : dy + grid, dx : dx + grid]
    dist = ((x[None] - means[:, None, None, :]) ** 2).sum(-1)  # (K, H, W)
    dist[~np.kron(near, up)] = np.inf
    return dist.argmin(0)


def test_pixel_owners_equal_the_all_tokens_definition():
    """The 9-candidate form gives, pixel for pixel, what the all-tokens argmin gives: real scenes with
    random clusterings, a 378 px image on 14 px patches (SigLIP-so400m's grid), and a flat image (ties)."""
    rng = np.random.default_rng(0)
    for it in eval_items(12, seed=3):
        for k in (2, 5, 9):
            a = rng.integers(0, k, 256)
            np.testing.assert_array_equal(pixel_owners(a, it.image, 16, 4, k), _owners_by_definition(a, it.image, 16, 4, k))
    big = rng.integers(0, 256, (378, 378, 3)).astype(np.uint8)
    a = rng.integers(0, 32, 27 * 27)
    np.testing.assert_array_equal(pixel_owners(a, big, 27, 14, 32), _owners_by_definition(a, big, 27, 14, 32))
    flat = np.zeros((64, 64, 3), np.uint8)
    a = np.repeat(np.arange(4), 64)
    np.testing.assert_array_equal(pixel_owners(a, flat, 16, 4, 4), _owners_by_definition(a, flat, 16, 4, 4))


def test_token_masks_are_drawn_on_first_use_only(tiny_bundle):
    """A loop that only asks questions never pays for the masks: `tokenize` leaves them undrawn, and
    the first access draws what pixel_owners gives for the image."""
    from setok.runtime import Pipeline
    from setok.runtime.preprocess import normalize, to_unit_rgb

    pipe = Pipeline.open(tiny_bundle, threads=1)
    it = eval_items(1, seed=5)[0]
    vt = pipe.tokenize(it.image)
    pipe.answer(it.image, "how many objects are there", max_new_tokens=2)
    assert vt.crop._owners is None and vt.crop._unit is None
    pre = pipe.manifest.preprocessing
    unit = to_unit_rgb(normalize(it.image[None], pre["mean"], pre["std"])[0], pre)
    want = pixel_owners(vt.assignment, unit, pipe.grid, pipe.patch, vt.num_tokens)
    np.testing.assert_array_equal(vt.masks_crop, token_masks(want, vt.num_tokens))
    assert vt.crop._owners is not None and vt.masks is vt.masks_crop  # an encoder-size frame maps by the identity
