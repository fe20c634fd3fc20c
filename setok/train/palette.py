"""The detokenizer's colour codes (`DetokenizerConfig.palette`), found in the training data before
step 0: k-means over the object pixels (instance mask > 0) of a fixed set of training scenes, in
the encoder's normalised pixel space. Learned from the data, not read from the scene generator."""

from __future__ import annotations

import numpy as np
import torch

from setok.config import EncoderConfig
from setok.data.items import TrainItem
from setok.errors import InputError
from setok.model.encoder import preprocess

PALETTE_SCENES = 256


def colour_codebook(items: list[TrainItem], enc: EncoderConfig, k: int, iters: int = 20) -> torch.Tensor:
    """(k, 3) cluster centres of the items' object pixels; farthest-point starts, so that every
    distinct colour gets a centre before any colour gets two."""
    if any(it.instance_mask is None for it in items):
        raise InputError("--palette needs instance masks (the synthetic scenes); this data has none")
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), enc)  # (S, 3, H, W)
    mask = torch.from_numpy(np.stack([it.instance_mask for it in items])) > 0  # (S, H, W)
    pts = px.permute(0, 2, 3, 1)[mask]  # (P, 3)
    if len(pts) < k:
        raise InputError(f"--palette {k}: only {len(pts)} object pixels in {len(items)} scenes")
    centres = pts[:1]
    while len(centres) < k:
        centres = torch.cat([centres, pts[torch.cdist(pts, centres).min(1).values.argmax()][None]])
    for _ in range(iters):
        near = torch.cdist(pts, centres).argmin(1)
        centres = torch.stack([pts[near == j].mean(0) if (near == j).any() else centres[j] for j in range(k)])
    return centres
