"""Small building blocks shared by the encoder, merger and detokenizer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_2d(grid: int, dim: int) -> Tensor:
    """2-D sin/cos position code (grid*grid, dim): half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sin/cos position code needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    ang_y = ys.reshape(-1, 1) * freq  # (G*G, dim/4)
    ang_x = xs.reshape(-1, 1) * freq
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)  # (G*G, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, L, C) attends to ctx (B, S, C') (itself if None).

        mask: bool (B, L|1, S), True = may attend; or an additive float bias (B, heads, L, S).
        """
        ctx = x if ctx is None else ctx
        b, l, c = x.shape
        s, h = ctx.shape[1], self.heads
        q = self.q(x).reshape(b, l, h, c // h).transpose(1, 2)  # (B, L, C) -> (B, h, L, C/h)
        k, v = self.kv(ctx).reshape(b, s, 2, h, c // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, S, C/h)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, L|1, S): same mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, C/h)
        return self.proj(out.transpose(1, 2).reshape(b, l, c))  # (B, h, L, C/h) -> (B, L, C)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block; with `cross=True` it first cross-attends to a context."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, cross: bool = False, ctx_dim: int | None = None):
        super().__init__()
        self.cross = Attention(dim, heads, ctx_dim) if cross else None
        self.norm_c = nn.LayerNorm(dim) if cross else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor | None = None, ctx: Tensor | None = None, ctx_mask: Tensor | None = None) -> Tensor:
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), ctx, ctx_mask)
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linears, zero biases (ViT practice): stable from step one."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in raster order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, 3, G, p, G, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)  # (B, N, p*p*3)


def unpatchify(patches: Tensor, p: int) -> Tensor:
    """(B, N, p*p*3) -> (B, 3, H, W)."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    x = patches.reshape(b, g, g, p, p, 3)  # (B, G, G, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)  # (B, 3, H, W)
