"""train/speed.py: what makes a step cheaper must not change what it computes. The LLM's attention
switches to plain MatMul/Softmax only while bf16 steps run on the CPU and is restored after; the
compiled blocks give the plain blocks' outputs and keep the checkpoint's parameter names."""

import random

import numpy as np
import torch

from setok.data.items import item_stream
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim
from setok.train.sequences import batch_sequences
from setok.train.speed import CPU_BF16_ATTENTION, compile_blocks, step_attention

CPU = torch.device("cpu")


def _batch(model: Setokim, n: int = 4):
    items = item_stream("synthetic", model.cfg.encoder.image_size, 7).batch(0, n)
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), model.cfg.encoder)
    return items, px


def _losses(model: Setokim, items, px, amp=None) -> dict[str, float]:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        vt = model.vision(px)
        seqs = batch_sequences(model, items, vt, [random.Random(i) for i in range(len(items))])
        return {k: float(v) for k, v in model.losses(seqs).items()}


def test_bf16_cpu_steps_run_the_plain_attention_and_restore_it(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt).eval()
    before = model.llm.config._attn_implementation
    assert before != CPU_BF16_ATTENTION  # otherwise the switch below would prove nothing
    items, px = _batch(model)
    sdpa = _losses(model, items, px, torch.bfloat16)
    with step_attention(model.llm, CPU, torch.bfloat16):
        assert model.llm.config._attn_implementation == CPU_BF16_ATTENTION
        eager = _losses(model, items, px, torch.bfloat16)
    assert model.llm.config._attn_implementation == before
    assert sdpa.keys() == eager.keys()
    for k in sdpa:  # the same losses up to bf16 rounding
        assert abs(sdpa[k] - eager[k]) <= 0.03 * abs(sdpa[k]) + 1e-3, (k, sdpa[k], eager[k])
    with step_attention(model.llm, CPU, None):  # float32 steps keep the model's own attention
        assert model.llm.config._attn_implementation == before


def test_compiled_blocks_compute_what_the_plain_ones_do_and_keep_the_parameter_names(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt).eval()
    items, px = _batch(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        plain_tokens = model.vision(px).tokens
    plain = _losses(model, items, px)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    assert compile_blocks(model) == sum(len(m) for m in lists) > 0
    with torch.no_grad():
        compiled_tokens = model.vision(px).tokens
    torch.testing.assert_close(compiled_tokens, plain_tokens, atol=1e-4, rtol=1e-4)
    compiled = _losses(model, items, px)
    assert compiled.keys() == plain.keys()
    for k in plain:
        assert abs(compiled[k] - plain[k]) <= 1e-4 * abs(plain[k]) + 1e-5, (k, plain[k], compiled[k])
    assert list(model.state_dict()) == keys
