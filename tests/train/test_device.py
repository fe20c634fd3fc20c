"""`setok train --device / --precision`: bf16 autocast really runs (the losses move, the weights
stay float32), and a CUDA request on a machine without one is a one-line user error. The CUDA
run itself is tests/gpu/test_train_cuda.py (in the GPU check)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from setok.errors import InputError
from setok.train import TrainOptions, train
from setok.train.distributed import Dist
from setok.train.trainer import train_device


def _history(out, **kw) -> list[dict]:
    train(TrainOptions(preset="tiny", out=out, steps=4, batch_size=8, ckpt_every=100, **kw))
    return json.loads((out / "training_state.json").read_text())["history"]


def test_bf16_autocast_changes_the_losses_and_keeps_float32_weights(tmp_path):
    fp32 = _history(tmp_path / "fp32")
    bf16 = _history(tmp_path / "bf16", precision="bf16")
    first, second = fp32[0], bf16[0]  # same seed, same batch, same initial weights
    assert first.keys() == second.keys()
    for key in first.keys() - {"stage", "step"}:
        assert math.isfinite(second[key]), (key, second[key])
        # bf16 keeps 8 mantissa bits: close to float32, but not bit-equal (autocast really ran).
        assert abs(first[key] - second[key]) <= 0.05 * abs(first[key]) + 1e-3, (key, first[key], second[key])
    assert any(first[k] != second[k] for k in first.keys() - {"stage", "step"}), "bf16 ran as float32"
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "train", "--preset", "tiny", "--steps", "2",
                           "--device", "cuda", "--out", str(tmp_path / "ck")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error: --device cuda:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "ck").exists(), "nothing written for a run that never started"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(InputError, match="expected cpu, cuda, cuda:N or auto"):
        train_device(name, Dist())


def test_auto_and_cpu_resolve_here():
    assert train_device("cpu", Dist()) == torch.device("cpu")
    assert train_device("auto", Dist()).type == ("cuda" if torch.cuda.is_available() else "cpu")
