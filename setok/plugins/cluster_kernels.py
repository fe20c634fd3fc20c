"""DPC-KNN (../../shared/SETOK.md) as Triton kernels: the compute of the TensorRT cluster plugin.

Two launch plans over the same @triton.jit helpers, so both do identical float32 arithmetic:
- step kernels, one per stage, one program per (image, row), with [B, N, N] / [B, N] scratch;
- one fused kernel, one program per image, no scratch (every per-patch vector stays in
  registers and the d^2 rows are recomputed per phase). The TensorRT AOT plugin API takes ONE
  kernel per plugin and no workspace, so that is the form it embeds (trt_plugin.py).

Exactness against setok.model.cluster.dpc_knn: the reference's float32 order is kept
((sq_i + sq_j) - 2 g, clamp, zero diagonal, / C; k smallest summed ascending left to right;
densities compared through m; sqrt / div correctly rounded: tl.sqrt_rn / tl.div_rn, because
plain `/` and tl.sqrt lower to approximate PTX instructions). Two things cannot be bit-matched
and only matter on knife-edge inputs: the dot-product reduction order (BLAS vs a Triton tree)
and the last bit of exp. Equal features still give bit-equal rows, so exact ties stay ties.

triton is optional: this module imports without it and every entry point raises
MissingDependency. Kernels must be module globals (Triton resolves helper calls through the
module's globals; closures fail), hence the guarded import below instead of one in a function.
TRITON_INTERPRET=1 must be set before this module is first imported to run on CPU tensors.
"""

from __future__ import annotations

import logging
import struct
from types import ModuleType

import torch

from setok.errors import MissingDependency

log = logging.getLogger(__name__)

_MISSING = "triton is needed for the cluster plugin kernels: pip install triton"

try:  # optional dependency: the kernels are defined only where triton is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]


def require_triton() -> ModuleType:
    """The triton module, or MissingDependency with the install hint."""
    if triton is None:
        raise MissingDependency(_MISSING)
    return triton


def block_sizes(n: int, c: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): a whole row of N in one block; C walked in chunks of <= 32."""
    return max(16, 1 << (max(n, 1) - 1).bit_length()), min(32, max(16, 1 << (max(c, 1) - 1).bit_length()))


if triton is not None:
    INF = tl.constexpr(float("inf"))  # kernels may read only constexpr globals

    # ------------------------------------------------------------------ shared helpers

    @triton.jit
    def _sq_norms(xb, n, c, offs, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """||x_j||^2 for every j of one image (xb points at the image), same reduction as _dots."""
        acc = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, c, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            xj = tl.load(xb + offs[:, None] * c + oc[None, :], mask=(offs[:, None] < n) & (oc[None, :] < c), other=0.0)
            acc += tl.sum(xj * xj, axis=1)
        return acc

    @triton.jit
    def _d2_row(xb, i, n, c, sq, offs, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Row i of d^2 / C in the reference's order; columns >= n are garbage (callers mask)."""
        g = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, c, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            xi = tl.load(xb + i * c + oc, mask=oc < c, other=0.0)
            xj = tl.load(xb + offs[:, None] * c + oc[None, :], mask=(offs[:, None] < n) & (oc[None, :] < c), other=0.0)
            g += tl.sum(xj * xi[None, :], axis=1)  # same products/tree as _sq_norms: x_i == x_j gives 0
        sq_i = tl.min(tl.where(offs == i, sq, INF), axis=0)
        d2 = (sq_i + sq) - 2.0 * g
        d2 = tl.where(offs == i, 0.0, tl.maximum(d2, 0.0))
        return tl.div_rn(d2, c * 1.0)  # C exact in fp32 (C < 2^24)

    @triton.jit
    def _knn_mean(d2, valid, offs, k_eff, BLOCK_N: tl.constexpr):
        """Mean of the k_eff smallest entries: k passes of "next smallest", summed as they come."""
        row = tl.where(valid, d2, INF)
        acc = 0.0
        for _ in range(k_eff):
            v = tl.min(row, axis=0)
            first = tl.min(tl.where(row == v, offs, BLOCK_N), axis=0)  # remove one copy: multiset
            row = tl.where(offs == first, INF, row)
            acc += v
        return tl.div_rn(acc, k_eff * 1.0)

    @triton.jit
    def _peak_score(d, m, valid, offs, i, big):
        """exp(-m_i) * delta_i; delta = min d over denser j, `big` for the densest patch."""
        m_i = tl.min(tl.where(offs == i, m, INF), axis=0)
        denser = valid & ((m < m_i) | ((m == m_i) & (offs < i)))
        delta = tl.min(tl.where(denser, d, INF), axis=0)
        has = tl.max(denser.to(tl.int32), axis=0) > 0
        delta = tl.where(has, delta, big)
        return tl.exp(-m_i) * delta

    @triton.jit
    def _is_center(s, valid, offs, i, tau, min_tokens, max_tokens):
        """rank_i < clamp(#(s > tau), min_tokens, max_tokens); rank: score desc, index asc."""
        s_i = tl.min(tl.where(offs == i, s, INF), axis=0)
        before = valid & ((s > s_i) | ((s == s_i) & (offs < i)))
        rank = tl.sum(before.to(tl.int32), axis=0)
        npass = tl.sum((valid & (s > tau)).to(tl.int32), axis=0)
        count = tl.minimum(tl.maximum(npass, min_tokens), max_tokens)
        return rank < count

    @triton.jit
    def _assign(d, ic, valid, offs, i, BLOCK_N: tl.constexpr):
        """Token of the nearest center (first index on ties); a center owns itself."""
        dc = tl.where(ic & valid, d, INF)
        mn = tl.min(dc, axis=0)
        nearest = tl.min(tl.where(dc == mn, offs, BLOCK_N), axis=0)  # all-inf row -> 0, as argmin
        own = tl.max((ic & (offs == i)).to(tl.int32), axis=0) > 0  # i is a center: d_ii = 0 may tie
        nearest = tl.where(own, i, nearest)
        return tl.sum((ic & (offs <= nearest)).to(tl.int64), axis=0) - 1

    @triton.jit
    def _centers(ic, offs, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """Slot t -> patch index of the t-th center in raster order, -1 past the last."""
        token_of = tl.cumsum(ic.to(tl.int32), axis=0) - 1
        slots = tl.arange(0, BLOCK_T)
        hit = ic[None, :] & (token_of[None, :] == slots[:, None])
        idx = tl.min(tl.where(hit, offs[None, :], BLOCK_N), axis=1)
        return tl.where(idx == BLOCK_N, -1, idx).to(tl.int64)

    # ------------------------------------------------------------------ step kernels, grid (B, N)

    @triton.jit
    def pairwise_sq_kernel(x_ptr, d2_ptr, n, c, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        xb = x_ptr + b.to(tl.int64) * n * c
        sq = _sq_norms(xb, n, c, offs, BLOCK_N, BLOCK_C)
        row = _d2_row(xb, i, n, c, sq, offs, BLOCK_N, BLOCK_C)
        tl.store(d2_ptr + (b.to(tl.int64) * n + i) * n + offs, row, mask=offs < n)

    @triton.jit
    def knn_density_kernel(d2_ptr, m_ptr, n, k_eff, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        row = tl.load(d2_ptr + (b.to(tl.int64) * n + i) * n + offs, mask=offs < n, other=INF)
        tl.store(m_ptr + b * n + i, _knn_mean(row, offs < n, offs, k_eff, BLOCK_N))

    @triton.jit
    def peak_score_kernel(d2_ptr, m_ptr, score_ptr, n, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        valid = offs < n
        d2b = d2_ptr + b.to(tl.int64) * n * n
        m = tl.load(m_ptr + b * n + offs, mask=valid, other=INF)
        d = tl.sqrt_rn(tl.load(d2b + i * n + offs, mask=valid, other=0.0))
        big2 = 0.0
        m_i = tl.min(tl.where(offs == i, m, INF), axis=0)
        densest = tl.sum((valid & ((m < m_i) | ((m == m_i) & (offs < i)))).to(tl.int32), axis=0) == 0
        if densest:  # only one program per image pays the N^2 image-wide max
            for r in range(n):
                big2 = tl.maximum(big2, tl.max(tl.load(d2b + r * n + offs, mask=valid, other=0.0), axis=0))
        # sqrt is monotone and correctly rounded: sqrt(max d2) == max sqrt(d2)
        tl.store(score_ptr + b * n + i, _peak_score(d, m, valid, offs, i, tl.sqrt_rn(big2)))

    @triton.jit
    def select_kernel(score_ptr, ic_ptr, n, tau, min_tokens, max_tokens, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        valid = offs < n
        s = tl.load(score_ptr + b * n + offs, mask=valid, other=-INF)
        tl.store(ic_ptr + b * n + i, _is_center(s, valid, offs, i, tau, min_tokens, max_tokens).to(tl.int8))

    @triton.jit
    def assign_kernel(d2_ptr, ic_ptr, out_ptr, n, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        valid = offs < n
        ic = tl.load(ic_ptr + b * n + offs, mask=valid, other=0) != 0
        d = tl.sqrt_rn(tl.load(d2_ptr + (b.to(tl.int64) * n + i) * n + offs, mask=valid, other=0.0))
        tl.store(out_ptr + b * n + i, _assign(d, ic, valid, offs, i, BLOCK_N))

    @triton.jit
    def centers_kernel(ic_ptr, centers_ptr, num_ptr, n, max_tokens, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """Grid (B,): the centers row and num_tokens of one image."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_N)
        ic = tl.load(ic_ptr + b * n + offs, mask=offs < n, other=0) != 0
        slots = tl.arange(0, BLOCK_T)
        tl.store(centers_ptr + b * max_tokens + slots, _centers(ic, offs, BLOCK_T, BLOCK_N), mask=slots < max_tokens)
        tl.store(num_ptr + b, tl.sum(ic.to(tl.int64), axis=0))

    # ------------------------------------------------------------------ fused kernel, grid (B,)

    @triton.jit
    def _invalid(assign_row, n, centers_row, max_tokens, BLOCK_T: tl.constexpr):
        slots = tl.arange(0, BLOCK_T)
        for s0 in range(0, n, BLOCK_T):
            tl.store(assign_row + s0 + slots, tl.full([BLOCK_T], -1, tl.int64), mask=s0 + slots < n)
        tl.store(centers_row + slots, tl.full([BLOCK_T], -1, tl.int64), mask=slots < max_tokens)

    @triton.jit
    def dpc_knn_fused_kernel(
        x_ptr, n, c, k, tau_bits, min_tokens, max_tokens, assign_ptr, num_ptr, centers_ptr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Whole DPC-KNN of one image; per-patch vectors live in registers, d^2 rows recomputed.

        Argument order is TensorRT's AOT layout: input tensors, integer scalars, output tensors.
        AOT scalars are integers only, so tau arrives as its float32 bit pattern; k is clipped
        to N here because the launch-side expressions cannot take a min.
        """
        tau = tau_bits.to(tl.float32, bitcast=True)
        k_eff = tl.minimum(k, n)
        b = tl.program_id(0)
        if n > BLOCK_N:
            # An AOT engine embeds this kernel compiled for one BLOCK_N; a longer row cannot be
            # held. Say so in the outputs (-1 everywhere, no real clustering has num_tokens < 1)
            # instead of silently clustering the first BLOCK_N patches; the runtime checks it.
            _invalid(assign_ptr + b * n, n, centers_ptr + b * max_tokens, max_tokens, BLOCK_T)
            tl.store(num_ptr + b, -1)
            return
        offs = tl.arange(0, BLOCK_N)
        valid = offs < n
        xb = x_ptr + b.to(tl.int64) * n * c
        sq = _sq_norms(xb, n, c, offs, BLOCK_N, BLOCK_C)
        m = tl.full([BLOCK_N], INF, tl.float32)
        big2 = 0.0
        for i in range(n):  # phase 1: densities and the image-wide max of d^2
            d2 = _d2_row(xb, i, n, c, sq, offs, BLOCK_N, BLOCK_C)
            m = tl.where(offs == i, _knn_mean(d2, valid, offs, k_eff, BLOCK_N), m)
            big2 = tl.maximum(big2, tl.max(tl.where(valid, d2, 0.0), axis=0))
        big = tl.sqrt_rn(big2)
        s = tl.full([BLOCK_N], -INF, tl.float32)
        for i in range(n):  # phase 2: scores
            d = tl.sqrt_rn(_d2_row(xb, i, n, c, sq, offs, BLOCK_N, BLOCK_C))
            s = tl.where(offs == i, _peak_score(d, m, valid, offs, i, big), s)
        ic = offs < 0
        for i in range(n):  # phase 3: centers
            ic = ic | ((offs == i) & _is_center(s, valid, offs, i, tau, min_tokens, max_tokens))
        for i in range(n):  # phase 4: assignment
            d = tl.sqrt_rn(_d2_row(xb, i, n, c, sq, offs, BLOCK_N, BLOCK_C))
            tl.store(assign_ptr + b * n + i, _assign(d, ic, valid, offs, i, BLOCK_N))
        slots = tl.arange(0, BLOCK_T)
        tl.store(centers_ptr + b * max_tokens + slots, _centers(ic, offs, BLOCK_T, BLOCK_N), mask=slots < max_tokens)
        tl.store(num_ptr + b, tl.sum(ic.to(tl.int64), axis=0))


STEP_KERNELS = (
    "pairwise_sq_kernel", "knn_density_kernel", "peak_score_kernel",
    "select_kernel", "assign_kernel", "centers_kernel",
)  # fmt: skip
FUSED_KERNEL = "dpc_knn_fused_kernel"


def kernel(name: str):  # -> triton JITFunction
    """A kernel of this module by name (MissingDependency without triton)."""
    require_triton()
    return globals()[name]


def _check(x: torch.Tensor, k: int, max_tokens: int) -> torch.Tensor:
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"patch_features must be (B, N, C) with N >= 1, got shape {tuple(x.shape)}")
    if k < 1 or max_tokens < 1:
        raise ValueError(f"need k >= 1 and max_tokens >= 1, got k={k}, max_tokens={max_tokens}")
    return x.to(torch.float32).contiguous()


def tau_bits(tau: float) -> int:
    """The int32 bit pattern of float32(tau) (how the fused kernel receives tau)."""
    return struct.unpack("<i", struct.pack("<f", tau))[0]


def block_t(max_tokens: int) -> int:
    return max(16, 1 << (max_tokens - 1).bit_length())


def dpc_knn_triton(
    x: torch.Tensor, k: int, tau: float, min_tokens: int, max_tokens: int, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN of SETOK.md on (B, N, C) float features -> (assignment, num_tokens, centers), int64.

    Step kernels by default; fused=True runs the single-kernel form the AOT plugin embeds.
    """
    require_triton()
    x = _check(x, k, max_tokens)
    b, n, _ = x.shape
    dev = x.device
    assignment = torch.empty((b, n), dtype=torch.int64, device=dev)
    num_tokens = torch.empty((b,), dtype=torch.int64, device=dev)
    centers = torch.empty((b, max_tokens), dtype=torch.int64, device=dev)
    launch_dpc_knn(x, assignment, num_tokens, centers, k, tau, min_tokens, max_tokens, fused)
    return assignment, num_tokens, centers


def launch_dpc_knn(
    x: torch.Tensor, assignment: torch.Tensor, num_tokens: torch.Tensor, centers: torch.Tensor,
    k: int, tau: float, min_tokens: int, max_tokens: int, fused: bool = False,
) -> None:
    """Fill preallocated outputs (the TensorRT JIT plugin's entry: outputs are TRT's buffers)."""
    b, n, c = x.shape
    bn, bc = block_sizes(n, c)
    k_eff = min(k, n)  # the reference pads topk with +inf columns and divides by min(k, N)
    if fused:
        dpc_knn_fused_kernel[(b,)](
            x, n, c, k, tau_bits(tau), min_tokens, max_tokens, assignment, num_tokens, centers,
            BLOCK_N=bn, BLOCK_C=bc, BLOCK_T=block_t(max_tokens),
        )  # fmt: skip
        return
    d2 = torch.empty((b, n, n), dtype=torch.float32, device=x.device)
    m = torch.empty((b, n), dtype=torch.float32, device=x.device)
    score = torch.empty((b, n), dtype=torch.float32, device=x.device)
    ic = torch.empty((b, n), dtype=torch.int8, device=x.device)
    rows = (b, n)
    pairwise_sq_kernel[rows](x, d2, n, c, BLOCK_N=bn, BLOCK_C=bc)
    knn_density_kernel[rows](d2, m, n, k_eff, BLOCK_N=bn)
    peak_score_kernel[rows](d2, m, score, n, BLOCK_N=bn)
    select_kernel[rows](score, ic, n, float(tau), min_tokens, max_tokens, BLOCK_N=bn)
    assign_kernel[rows](d2, ic, assignment, n, BLOCK_N=bn)
    centers_kernel[(b,)](ic, centers, num_tokens, n, max_tokens, BLOCK_N=bn, BLOCK_T=block_t(max_tokens))
    log.debug("dpc_knn_triton: B=%d N=%d C=%d BLOCK_N=%d", b, n, c, bn)
