"""`setok train --device cuda --precision bf16` on a real GPU: the same steps as on the CPU, a
checkpoint that loads on the CPU, losses close to the CPU run's (part of the GPU check)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from setok.model.setokim import Setokim
from setok.train import TrainOptions, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _history(out, **kw) -> list[dict]:
    train(TrainOptions(preset="tiny", out=out, steps=6, batch_size=8, ckpt_every=100, **kw))
    return json.loads((out / "training_state.json").read_text())["history"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_training_follows_the_cpu_run(tmp_path, precision):
    cpu = _history(tmp_path / "cpu")
    gpu = _history(tmp_path / precision, device="cuda", precision=precision)
    assert [(h["stage"], h["step"]) for h in cpu] == [(h["stage"], h["step"]) for h in gpu]
    tol = 0.02 if precision == "fp32" else 0.1  # kernels differ; bf16 keeps 8 mantissa bits
    for key in cpu[0].keys() - {"stage", "step"}:
        assert math.isfinite(gpu[0][key]) and abs(cpu[0][key] - gpu[0][key]) <= tol * abs(cpu[0][key]) + 1e-3, key
    model = Setokim.from_pretrained(tmp_path / precision)  # saved from the GPU, loads on the CPU
    assert next(model.parameters()).device.type == "cpu"
