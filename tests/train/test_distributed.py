"""`setok train` under torchrun: 2 processes follow the loss curve of 1 with the same global batch."""

import json
import subprocess
import sys


def _train(out, nproc: int) -> list[dict]:
    args = ["train", "--preset", "tiny", "--steps", "8", "--batch-size", "8", "--ckpt-every", "100", "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "setok.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "setok.cli", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "training_state.json").read_text())["history"]


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def test_two_processes_match_one(tmp_path):
    one, two = _train(tmp_path / "one", 1), _train(tmp_path / "two", 2)
    assert [(h["stage"], h["step"]) for h in one] == [(h["stage"], h["step"]) for h in two]
    for a, b in zip(one, two):
        for key in a.keys() - {"stage", "step"}:
            # Same global batch, same draws. Stage 1's grouping loss is a per-rank mean (pairs
            # split between the ranks); stage 2 divides each rank's sums by the global counts, so
            # only float order and stage 1's small drift remain (measured <= 1.3 %; per-rank
            # means had the segmentation loss 6 % off).
            tol = 0.05 if a["stage"] == 1 else 0.03
            assert abs(a[key] - b[key]) <= tol * abs(a[key]) + 1e-3, (a["stage"], a["step"], key, a[key], b[key])
    assert (tmp_path / "two" / "model.safetensors").is_file()
