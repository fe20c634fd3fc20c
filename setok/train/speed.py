"""What makes a training step cheaper on the CPU without changing what it computes: the LLM's
attention kernel under bf16, and (`--compile`) torch.compile of every transformer block.

Measured on the `small` preset, 2 cores with AVX-512 BF16 (`scripts/train_step_times.py`,
docs/generation.md "Cheaper steps"): stage 2 under bf16 went 1.21 -> 0.97 s a step with the eager
attention and -> 0.79 with the blocks compiled too; stage 1 stayed ~0.5-0.7 s. The LLM's sequences
are short (~40-80 tokens), where PyTorch's CPU flash kernel in bf16 runs 2.7x slower than plain
MatMul/Softmax (its backward was a third of the step); the vision tower's 256 patches are where the
flash kernel wins, so only the LLM's attention is switched. Compiling fuses the elementwise work (norms, RoPE, SwiGLU, autocast
casts) that moved as much memory as the MatMuls did.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from setok.model.families import set_attention

log = logging.getLogger(__name__)

# The attention implementation of the LLM while a bf16 step runs on the CPU.
CPU_BF16_ATTENTION = "eager"
# Compiled variants kept per block class. The encoder, merger and detokenizer share one Block class,
# and each runs with and without gradients, masks and cross-attention (stage 1, stage 2, tau
# calibration, the token bank): the `small` recipe reached dynamo's default of 8 at the token bank,
# which then ran uncompiled.
RECOMPILE_LIMIT = 64


def compile_blocks(model: nn.Module) -> int:
    """Compile every element of every ModuleList in `model` (the transformer blocks of each stage),
    in place: parameter names and the saved checkpoint are unchanged. Dynamic shapes, so length
    buckets and token counts that vary per step do not recompile. Returns how many were compiled."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in blocks:
        block.compile(dynamic=True)
    log.info("torch.compile: %d blocks (the first steps compile them, ~1.5 min on a cold cache)", len(blocks))
    return len(blocks)


@contextlib.contextmanager
def step_attention(llm: nn.Module, device: torch.device, amp: torch.dtype | None):
    """Inside: the LLM's attention as plain MatMul/Softmax when bf16 steps run on the CPU (as it
    was, elsewhere); restored on the way out, so checkpoints and exports never see it."""
    impl = CPU_BF16_ATTENTION if device.type == "cpu" and amp == torch.bfloat16 else None
    before = set_attention(llm, impl)
    try:
        yield
    finally:
        set_attention(llm, before)
