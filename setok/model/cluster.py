"""DPC-KNN clustering, exactly as ../shared/SETOK.md defines it, batched over images.

Every step is a fixed-shape tensor op (no data-dependent shapes, no Python loops over images),
so the same function exports to standard ONNX ops and is the reference the Triton plugin and
the TensorRT engine are checked against. Read it next to SETOK.md, line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from setok.config import ClusterConfig


@dataclass
class Clusters:
    assignment: Tensor  # (B, N) int64 in [0, num_tokens)
    num_tokens: Tensor  # (B,) int64
    centers: Tensor  # (B, max_tokens) int64, raster-ordered patch indices, -1 padded


def pairwise_sq(x: Tensor) -> Tensor:
    """d_ij^2 = ||x_i - x_j||^2 / C.  (B, N, C) -> (B, N, N), exactly 0 on the diagonal."""
    c = x.shape[-1]
    sq = (x * x).sum(-1)  # (B, N)
    # Expansion instead of (B, N, N, C) differences: memory N^2 instead of N^2 * C.
    d2 = sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * torch.matmul(x, x.transpose(1, 2))
    idx = torch.arange(x.shape[1], device=x.device)
    eye = idx[:, None] == idx[None, :]  # not torch.eye: its bool EyeLike does not run in ORT
    return d2.clamp_min(0.0).masked_fill(eye, 0.0) / c  # rounding can leave tiny diagonal values


def pairwise_distance(x: Tensor) -> Tensor:
    """d_ij = ||x_i - x_j||_2 / sqrt(C).  (B, N, C) -> (B, N, N)."""
    return torch.sqrt(pairwise_sq(x))


def neighbour_mean(d2: Tensor, k: int) -> Tensor:
    """m_i = mean of d_ij^2 over the k nearest j (i itself included).  (B, N, N) -> (B, N).

    Summed in ascending order, left to right, in float32: a defined order makes equal
    neighbour multisets give bit-equal m in every implementation (torch, ONNX, Triton), so
    ties stay ties and are broken by index as SETOK.md says, not by rounding noise.
    """
    n = d2.shape[-1]
    # k columns of +inf make topk(k) valid for any N (an exported graph has N dynamic); the
    # padding is zeroed after, which keeps the float32 sum bit-exact, and we divide by min(k, N).
    pad = torch.full_like(d2[..., :1], float("inf")).expand(*d2.shape[:-1], k)
    nearest = torch.topk(torch.cat([d2, pad], -1), k, dim=-1, largest=False).values  # (B, N, k) ascending
    valid = torch.arange(k, device=d2.device) < n
    nearest = nearest.masked_fill(~valid, 0.0)
    acc = nearest[..., 0]
    for j in range(1, k):
        acc = acc + nearest[..., j]
    return acc / valid.sum().to(acc.dtype)


def denser_than(m: Tensor) -> Tensor:
    """mask[b, i, j] = "j is denser than i": rho_j > rho_i, or equal and j < i.  (B, N) -> (B, N, N).

    Compared through m (rho = exp(-m) is strictly decreasing, so rho_j > rho_i <=> m_j < m_i):
    the order then does not depend on how a backend rounds exp.
    """
    n = m.shape[-1]
    idx = torch.arange(n, device=m.device)
    m_i, m_j = m.unsqueeze(2), m.unsqueeze(1)  # (B, N, 1), (B, 1, N)
    lower = (idx.unsqueeze(0) < idx.unsqueeze(1)).unsqueeze(0)  # (1, N, N): j < i
    return (m_j < m_i) | ((m_j == m_i) & lower)


def peak_distance(d: Tensor, denser: Tensor) -> Tensor:
    """delta_i = min d_ij over denser j; the densest patch gets the image-wide max of d."""
    big = d.amax(dim=(1, 2))  # (B,) image-wide maximum (the batched original, not per row)
    masked = d.masked_fill(~denser, float("inf"))
    delta = masked.amin(-1)  # (B, N); inf only for the densest patch (distances are finite)
    # Tested on delta, not with denser.any(-1): the exporter writes any() as an int64 (B, N, N) sum.
    return torch.where(delta < float("inf"), delta, big.unsqueeze(1))


def score_rank(score: Tensor) -> Tensor:
    """Rank of each score, highest first, ties by lower index.  (B, N) -> (B, N) int32.

    Counted in float32 (exact below 2^24) and returned as int32: an integer sum over the (B, N, N)
    mask exports as an int64 (B, N, N) tensor, twice the distances' memory at N = 1024."""
    n = score.shape[-1]
    idx = torch.arange(n, device=score.device)
    s_i, s_j = score.unsqueeze(2), score.unsqueeze(1)
    lower = (idx.unsqueeze(0) < idx.unsqueeze(1)).unsqueeze(0)  # (1, N, N): j < i
    before = (s_j > s_i) | ((s_j == s_i) & lower)
    return before.float().sum(-1).to(torch.int32)


def select_centers(score: Tensor, cfg: ClusterConfig) -> Tensor:
    """Center mask (B, N): score > tau, clamped to [min_tokens, max_tokens] by the highest scores.

    Passing centers are exactly the top-`npass` by rank, so every case of SETOK.md (none pass,
    too many pass) is "the top K by rank" with K = clamp(npass, min_tokens, max_tokens).
    When 0 < npass < min_tokens we also fill up to min_tokens, so the count always lies in
    [min_tokens, max_tokens] (capped at N). A plain clamp, so N stays dynamic in an export.
    """
    npass = (score > cfg.tau).sum(-1, keepdim=True, dtype=torch.int32)  # (B, 1)
    # No min(., N) on the bounds: npass <= N, and a count >= N selects every patch anyway.
    # Max/Min rather than clamp: TensorRT's Clip takes float types only.
    lo = torch.tensor(cfg.min_tokens, dtype=torch.int32, device=score.device)
    hi = torch.tensor(cfg.max_tokens, dtype=torch.int32, device=score.device)
    count = torch.minimum(torch.maximum(npass, lo), hi)
    return score_rank(score) < count


def assign(d: Tensor, is_center: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest center per patch (ties: lower token index); centers own themselves.

    Returns (assignment (B, N), token id of each patch's center order (B, N)).
    """
    # float32 cumsum (exact below 2^24, and the type TensorRT's CumSum takes), then int64.
    token_of = (torch.cumsum(is_center.float(), -1) - 1).long()  # (B, N): token index if a center
    to_centers = d.masked_fill(~is_center.unsqueeze(1), float("inf"))  # (B, N, N) over centers j
    # argmin returns the first minimum = lowest patch index = lowest token index (raster order).
    nearest = to_centers.argmin(-1)  # (B, N) patch index of the chosen center
    assignment = torch.gather(token_of, 1, nearest)
    return torch.where(is_center, token_of, assignment), token_of


def density_peaks(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Distances d (B, N, N) and scores rho * delta (B, N) of patch features (B, N, C)."""
    d2 = pairwise_sq(x)  # (B, N, N)
    d = torch.sqrt(d2)
    m = neighbour_mean(d2, k)  # (B, N)
    delta = peak_distance(d, denser_than(m))  # (B, N)
    return d, torch.exp(-m) * delta


def dpc_knn(x: Tensor, cfg: ClusterConfig) -> Clusters:
    """Cluster patch features (B, N, C) into semantic tokens. See SETOK.md "DPC-KNN, exactly"."""
    d, score = density_peaks(x, cfg.k)
    is_center = select_centers(score, cfg)  # (B, N) bool
    assignment, token_of = assign(d, is_center)
    num_tokens = is_center.long().sum(-1)  # (B,)
    return Clusters(assignment, num_tokens, centers_list(is_center, token_of, cfg.max_tokens))


def centers_list(is_center: Tensor, token_of: Tensor, max_tokens: int) -> Tensor:
    """(B, N) center mask -> (B, max_tokens) raster-ordered patch indices, -1 padded."""
    b, n = is_center.shape
    idx = torch.arange(n, device=is_center.device).expand(b, n)
    # Scatter each center's patch index to its token slot; non-centers go to a dump slot.
    slot = torch.where(is_center, token_of, torch.full_like(token_of, max_tokens))
    out = torch.full((b, max_tokens + 1), -1, dtype=torch.long, device=is_center.device)
    out = out.scatter(1, slot, torch.where(is_center, idx, torch.full_like(idx, -1)))
    return out[:, :max_tokens]


def fixed_topk(x: Tensor, k_tokens: int, k: int) -> Clusters:
    """TCFormer-style baseline: always the `k_tokens` highest DPC scores, no threshold."""
    cfg = ClusterConfig(k=k, tau=float("inf"), min_tokens=k_tokens, max_tokens=k_tokens)
    return dpc_knn(x, cfg)


def every_patch(x: Tensor) -> Clusters:
    """Patch baseline: every patch is its own token."""
    b, n, _ = x.shape
    idx = torch.arange(n, device=x.device).expand(b, n).clone()
    return Clusters(idx, torch.full((b,), n, dtype=torch.long, device=x.device), idx.clone())


class DensityPeakCluster(nn.Module):
    """The `cluster` stage as a module (no parameters): what the exporter traces."""

    def __init__(self, cfg: ClusterConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, patch_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = dpc_knn(patch_features, self.cfg)
        return c.assignment, c.num_tokens, c.centers
