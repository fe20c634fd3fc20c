"""detokenizer stage: one learnable query per output patch cross-attends to the vision tokens,
a few transformer blocks, and a pixel head that paints each patch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from setok.config import DetokenizerConfig, EncoderConfig
from setok.model.layers import Block, init_weights, sincos_2d, unpatchify
from setok.model.merger import token_mask


class Detokenizer(nn.Module):
    def __init__(self, cfg: DetokenizerConfig, enc: EncoderConfig, token_dim: int):
        super().__init__()
        self.patch = enc.patch_size
        self.queries = nn.Parameter(torch.zeros(1, enc.num_patches, cfg.width))
        self.register_buffer("pos", sincos_2d(enc.grid, cfg.width), persistent=False)
        self.token_in = nn.Linear(token_dim, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cross=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, enc.patch_size * enc.patch_size * 3)
        init_weights(self)

    def forward(self, tokens: Tensor, num_tokens: Tensor) -> Tensor:
        """(B, T, D), (B,) -> image (B, 3, H, W) in the encoder's normalised pixel space."""
        ctx = self.token_in(tokens)  # (B, T, W)
        keys = token_mask(num_tokens, tokens.shape[1]).unsqueeze(1)  # (B, 1, T)
        x = (self.queries + self.pos).expand(tokens.shape[0], -1, -1)  # (B, N, W)
        for blk in self.blocks:
            x = blk(x, ctx=ctx, ctx_mask=keys)
        return unpatchify(self.head(self.norm(x)), self.patch)  # (B, N, p*p*3) -> (B, 3, H, W)
