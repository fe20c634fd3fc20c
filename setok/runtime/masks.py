"""Token masks at pixel resolution (numpy only: the runtime and the PyTorch evaluation share it).

A token owns the patches of its cluster, so a patch-level mask has 4x4-pixel steps at object
borders: on the synthetic scenes even perfect clusters and a perfect token choice give referring
masks only 0.70 IoU (measured on 200 held-out scenes). Each pixel instead goes to one of the
clusters that own its patch or a neighbouring patch (3x3), the one whose mean colour is nearest:
interiors keep their cluster, and border pixels follow the colour edge between the two clusters
that meet there. Clusters stay exactly DPC-KNN's; this only draws their borders inside patches.
"""

from __future__ import annotations

import numpy as np


def pixel_owners(assignment: np.ndarray, pixels: np.ndarray, grid: int, patch: int, num_tokens: int) -> np.ndarray:
    """(N,) token per patch + (H, W, 3) pixels (any per-channel affine scale) -> (H, W) token per pixel."""
    k = int(num_tokens)
    member = assignment.reshape(grid, grid)[None] == np.arange(k)[:, None, None]  # (K, G, G)
    up = np.ones((1, patch, patch), bool)
    owned = np.kron(member, up)  # (K, H, W): patch-level ownership
    x = pixels.astype(np.float64)
    means = np.einsum("khw,hwc->kc", owned, x) / np.maximum(owned.sum((1, 2)), 1)[:, None]  # (K, 3)
    pad = np.pad(member, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros_like(member)
    for dy in range(3):
        for dx in range(3):
            near |= pad[:, dy : dy + grid, dx : dx + grid]  # owns a patch in the 3x3 neighbourhood
    dist = ((x[None] - means[:, None, None, :]) ** 2).sum(-1)  # (K, H, W)
    dist[~np.kron(near, up)] = np.inf
    return dist.argmin(0)  # ties: the lower token index


def token_masks(owners: np.ndarray, num_tokens: int) -> np.ndarray:
    """(H, W) token per pixel -> (K, H, W) bool: exactly one token owns each pixel."""
    return owners[None] == np.arange(int(num_tokens))[:, None, None]
