"""The token bank (`SetokimConfig.token_bank`): real vision tokens of training scenes, and the snap of
a generated token onto its nearest one.

The LLM regresses each generated token with MSE, and an MSE regression of an uncertain token is an
average: of two colours, of a small and a large object, of a square and a circle, and the
detokenizer draws an average as a blended blob. Snapping the regressed token's content (every dim
but its centroid, dims 0-1, which the place head or the regression sets) onto the nearest token a
real image produced makes each generated object one that some real object was. Distances are
measured per dimension in units of the bank's own spread, so no wide dimension decides alone.
Measured on the shipped checkpoint, 500 held-out scenes on each of three seeds: gen_count 0.57-0.66
-> 0.75-0.79, gen_colour 0.84-0.86 -> 0.88-0.91 (docs/generation.md "The token bank").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenBank(nn.Module):
    def __init__(self, size: int, token_dim: int):
        super().__init__()
        # Filled from data (setok/train/bank.py) or loaded from a checkpoint; zeros until then. Kept
        # in the scaled space the distances are measured in, so the exported graph holds the bank once
        # (a raw copy beside the scaled one, and the exporter's folded keys^T, made it three: 25 MB, not 8).
        self.register_buffer("keys", torch.zeros(size, token_dim - 2))  # (M, D - 2) real tokens' content x inv_scale
        self.register_buffer("inv_scale", torch.ones(token_dim - 2))  # (D - 2,) 1 / the bank's std per dim
        self.register_buffer("key_sq", torch.zeros(size, 1))  # (M, 1) |key|^2, stored: folded, it was one more copy

    @property
    def tokens(self) -> Tensor:
        """(M, D - 2): the bank's tokens' content, unscaled."""
        return self.keys / self.inv_scale

    def forward(self, tokens: Tensor) -> Tensor:
        """(K, D) regressed tokens -> (K, D): dims 0-1 kept, the rest the nearest bank token's."""
        q = tokens[:, 2:] * self.inv_scale  # (K, D - 2)
        # |q - k|^2 without |q|^2 (the same for every key): a MatMul, ArgMin and Gather in ONNX, the
        # keys on the left so that MatMul and Gather read the same initializer.
        d2 = self.key_sq - (self.keys @ q.transpose(0, 1)) * 2  # (M, 1) - (M, K) -> (M, K)
        nearest = d2.argmin(0)  # (K,)
        return torch.cat([tokens[:, :2], self.keys[nearest] / self.inv_scale], -1)  # (K, 2) + (K, D - 2)

    @torch.no_grad()
    def fill(self, tokens: Tensor) -> None:
        """(M, D - 2) real tokens' content -> the bank and its per-dim scale."""
        self.inv_scale.copy_(1.0 / (tokens.std(0) + 1e-6))
        self.keys.copy_(tokens * self.inv_scale)
        self.key_sq.copy_((self.keys * self.keys).sum(-1, keepdim=True))
