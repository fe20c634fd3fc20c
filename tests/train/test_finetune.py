"""`setok finetune`: a second cosine cycle of the stage-2 losses over a trained checkpoint. The vision
tokenizer stays as it was (so a token bank drawn from it stays valid); the LLM and heads learn."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "setok.cli", "finetune", *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_trains_the_llm_and_heads_and_keeps_the_vision_tokenizer(tiny_ckpt, tmp_path, precision):
    out = tmp_path / "ft"
    proc = _run(str(tiny_ckpt), "--out", str(out), "--steps", "3", "--batch", "4", "--precision", precision)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = load_file(str(tiny_ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("vision.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    moved = [k for k in before if k.startswith(("llm.", "regress.")) and not torch.equal(before[k], after[k])]
    assert any(k.startswith("llm.") for k in moved) and any(k.startswith("regress.") for k in moved)
    state = json.loads((out / "training_state.json").read_text())
    assert state["finetune"] == {"steps": 3, "lr": 3e-4, "batch": 4, "seed": 321, "data": "synthetic", "floor": 0.1,
                                 "precision": precision, "compile": False}
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_ckpt / "config.json").read_text())


def test_finetune_refuses_a_missing_checkpoint_and_writes_nothing(tmp_path):
    out = tmp_path / "ft"
    proc = _run(str(tmp_path / "nope"), "--out", str(out))
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
