"""merger stage: one vision token per cluster.

inner transformer over all N patches with a block-diagonal same-cluster mask (exactly running
it cluster by cluster, but one static-shape pass), masked mean per cluster, inter transformer
across the cluster tokens, linear projection to the token width D.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from setok.config import MergerConfig
from setok.model.layers import Block, init_weights


def cluster_onehot(assignment: Tensor, max_tokens: int) -> Tensor:
    """(B, N) token ids -> (B, N, T) float membership."""
    slots = torch.arange(max_tokens, device=assignment.device)
    return (assignment.unsqueeze(-1) == slots).float()


def patch_coords(grid: int) -> Tensor:
    """(N, 2) patch centres (x, y) in [0, 1], raster order."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


OFFSET_FEATURES = 40  # offset_code's width


def _phases(points: Tensor) -> Tensor:
    """(..., 2) positions in image units -> (..., 20) phases at 5 frequencies along 4 directions
    (x, y and both diagonals: a diamond differs from a square only along the diagonals). Linear in
    the position, so the phase of an offset is a difference of phases."""
    dx, dy = points[..., 0], points[..., 1]
    dirs = torch.stack([dx, dy, (dx + dy) * 0.7071, (dx - dy) * 0.7071], -1)  # (..., 4)
    freqs = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], device=points.device) * torch.pi
    return (dirs.unsqueeze(-1) * freqs).flatten(-2)  # (..., 4, 5) -> (..., 20)


def offset_code(offset: Tensor) -> Tensor:
    """(B, N, 2) offsets in image units -> (B, N, 40): sin and cos of their phases."""
    phase = _phases(offset)  # (B, N, 20)
    return torch.cat([phase.sin(), phase.cos()], -1)  # (B, N, 40)


def offset_logits(points: Tensor, centres: Tensor, weights: Tensor) -> Tensor:
    """(P, 2) points, (B, T, 2) centres, (B, T, H, 40) weights -> (B, H, P, T): weights[b, t, h] .
    offset_code(points[p] - centres[b, t]), without the (B, T, P, 40) code of every offset: a
    phase of an offset is a difference of phases, and sin(a - b) = sin a cos b - cos a sin b
    (cos likewise), so each term is a code of the point times a code of the centre (at 729
    patches and 729 tokens the full code was ~85 MB per image; this is one (B, H, P, T) MatMul)."""
    ws, wc = weights[..., :20], weights[..., 20:]  # (B, T, H, 20): the sin and the cos terms
    b = _phases(centres).unsqueeze(2)  # (B, T, 1, 20)
    sb, cb = b.sin(), b.cos()
    per_centre = torch.cat([ws * cb + wc * sb, wc * cb - ws * sb], -1)  # (B, T, H, 40): coefficients of sin a, cos a
    a = _phases(points)  # (P, 20)
    per_point = torch.cat([a.sin(), a.cos()], -1)  # (P, 40)
    return per_point @ per_centre.permute(0, 2, 3, 1)  # (P, 40) @ (B, H, 40, T) -> (B, H, P, T)


def token_mask(num_tokens: Tensor, max_tokens: int) -> Tensor:
    """(B,) counts -> (B, T) True for real tokens."""
    return torch.arange(max_tokens, device=num_tokens.device).unsqueeze(0) < num_tokens.unsqueeze(1)


class Merger(nn.Module):
    """Token layout: dims 0-1 hold the cluster's centroid (x, y) in [0, 1]; the rest is learned.
    An explicit "where" lets the detokenizer place each token from the first step, and the LLM
    regresses it like any other dimension when it generates an image."""

    def __init__(self, cfg: MergerConfig, width: int, max_tokens: int, grid: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.register_buffer("coords", patch_coords(grid), persistent=False)
        self.inner = nn.ModuleList(Block(width, cfg.heads) for _ in range(cfg.inner_depth))
        self.inter = nn.ModuleList(Block(width, cfg.heads) for _ in range(cfg.inter_depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.token_dim - 2)
        self.shape = nn.Linear(OFFSET_FEATURES, width) if cfg.shape_code else None
        init_weights(self)

    def forward(self, patch_features: Tensor, assignment: Tensor, num_tokens: Tensor) -> Tensor:
        """(B, N, C), (B, N), (B,) -> vision tokens (B, T, D); rows >= num_tokens are zero."""
        same = assignment.unsqueeze(2) == assignment.unsqueeze(1)  # (B, N, N) block-diagonal
        member = cluster_onehot(assignment, self.max_tokens)  # (B, N, T)
        counts = member.sum(1).clamp_min(1.0).unsqueeze(-1)  # (B, T, 1)
        where = member.transpose(1, 2) @ self.coords / counts  # (B, T, N) @ (N, 2) -> (B, T, 2)
        x = patch_features
        if self.shape is not None:
            centre = member @ where  # (B, N, T) @ (B, T, 2) -> (B, N, 2): each patch's centroid
            x = x + self.shape(offset_code(self.coords - centre))
        for blk in self.inner:
            x = blk(x, mask=same)
        tokens = member.transpose(1, 2) @ x / counts  # (B, T, N) @ (B, N, C) -> (B, T, C)
        valid = token_mask(num_tokens, self.max_tokens)  # (B, T)
        keys = valid.unsqueeze(1)  # (B, 1, T): every token attends to real tokens only
        for blk in self.inter:
            tokens = blk(tokens, mask=keys)
        out = torch.cat([where, self.proj(self.norm(tokens))], -1)  # (B, T, D)
        return out * valid.unsqueeze(-1).to(out.dtype)
