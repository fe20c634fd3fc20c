"""Data-parallel training under `torchrun --nproc-per-node N` (gloo on CPU, NCCL on GPUs).

Every rank draws the same global batch (the stream is a pure function of the step) and keeps
its shard; gradients are averaged across ranks after each backward, exactly what
DistributedDataParallel's reducer does; the contrastive loss gathers embeddings from every rank
so its negatives are the global batch, as in one process. Rank 0 alone writes and logs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from setok.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm: str = "cpu"  # where collective tensors live: NCCL reduces CUDA tensors only

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: str = "cpu") -> Dist:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR; without them this is one
    process. Ranks training on CUDA talk over NCCL, on the CPU over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d (%s)", dist.get_rank(), world, backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local, f"cuda:{local}" if cuda else "cpu")


def shard(items: list, d: Dist) -> list:
    """This rank's share of the global batch (the global batch size must divide evenly)."""
    if len(items) % d.world:
        from setok.errors import InputError

        raise InputError(f"batch of {len(items)} does not split over {d.world} processes; use a multiple")
    return items[d.rank :: d.world]


def gather_cat(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate a tensor from every rank, keeping the gradient path to this rank's part."""
    if not d.active:
        return t
    sizes = gather_objects(t.shape[0], d)
    pad = max(sizes) - t.shape[0]  # all_gather needs equal shapes: pad, gather, then trim
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    parts = _AllGather.apply(padded, d.rank, d.world).chunk(d.world)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce:
    gloo has no reduce_scatter). Each rank computes the same global loss, so after the usual
    gradient averaging this rank's inputs get exactly the one-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


def gather_objects(obj: Any, d: Dist) -> list:
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params, d: Dist) -> None:
    if not d.active:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world


def mean_scalar(value: float, d: Dist) -> float:
    if not d.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=d.comm)
    dist.all_reduce(t)
    return float(t[0]) / d.world


def sum_counts(counts: dict[str, int], names: tuple[str, ...], d: Dist) -> dict[str, int]:
    """Per-name counts summed over ranks (a name a rank lacks counts 0 there)."""
    if not d.active:
        return {n: counts.get(n, 0) for n in names}
    import torch.distributed as dist

    t = torch.tensor([counts.get(n, 0) for n in names], dtype=torch.float64, device=d.comm)
    dist.all_reduce(t)
    return {n: int(v) for n, v in zip(names, t.tolist())}


def agree(flag: bool, d: Dist) -> bool:
    """Rank 0's decision for everyone (e.g. a wall-clock budget), so no rank leaves a stage alone."""
    if not d.active:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=d.comm)
    dist.broadcast(t, src=0)
    return bool(t[0])


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def train_device(name: str, dist: Dist) -> torch.device:
    """The device the steps run on; a CUDA request without a visible GPU is the user's error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise InputError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch {torch.__version__} sees no CUDA device; expected cpu or auto here")
    if name == "cuda" and dist.active:
        name = f"cuda:{dist.local_rank}"  # one GPU per torchrun rank
    dev = torch.device(name)
    if (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    torch.cuda.set_device(dev)
    return dev
