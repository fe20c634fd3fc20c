"""Experiment (issue #20, docs/generation.md "Generation that sees what it drew"): `setok finetune`'s
second cycle over a checkpoint with and without gen_feedback (the same steps and draws), then the
generation judge and VQA on held-out scenes with `setok eval`'s own rows. A/B of the mechanism.

    python scripts/feedback_probe.py setok/checkpoints/small --steps 300 --feedback 1 --out fb.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from setok.data.items import eval_items
from setok.eval import evaluation as E
from setok.model.setokim import Setokim
from setok.train.finetune import finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--feedback", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="keep the fine-tuned checkpoint here")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        shutil.copytree(a.ckpt, start)
        cfg = json.loads((start / "config.json").read_text())
        cfg["gen_feedback"] = bool(a.feedback)
        (start / "config.json").write_text(json.dumps(cfg, indent=2))
        t = time.time()
        tuned = finetune(start, a.save or Path(tmp) / "tuned", a.steps, a.lr)
        seconds = time.time() - t
        m = Setokim.from_pretrained(tuned).eval()
    with torch.no_grad():
        res = E.summarize(E.evaluate_rows(m, eval_items(a.n, a.eval_seed, m.cfg.encoder.image_size)))
    res.update(steps=a.steps, feedback=a.feedback, lr=a.lr, train_seconds=round(seconds, 1))
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
