"""Seconds per training step of the `small` preset with the shipped recipe's flags, per stage, for one
setting of precision / LLM attention / compiled blocks (docs/generation.md "Cheaper steps"). A fresh
random-init model each run; `--warmup` steps (compiling, when asked) are not timed. JSON on stdout.

usage: python scripts/train_step_times.py --precision bf16 --attention eager --compile [--steps 6]
"""
import argparse
import json
import time

import torch

from setok.config import preset
from setok.data.items import item_stream
from setok.model import text as T
from setok.model.families import set_attention
from setok.model.setokim import Setokim
from setok.train.trainer import Trainer, TrainOptions, prompt_words


def seconds_per_step(step, steps: int, warmup: int) -> float:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa", help="the LLM's, for every step")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    opts = TrainOptions(preset="small", out="/tmp/setok-step-times", tune_merger=True, place_head=True,
                        precision=a.precision, palette=8, compile=a.compile)
    cfg = preset("small")
    cfg.place_head, cfg.detokenizer.palette = True, 8
    stream = item_stream("synthetic", cfg.encoder.image_size, 0)
    model = Setokim(cfg, T.train_text_tokenizer(stream.corpus() + prompt_words(), cfg.llm.vocab_size), pretrained=True)
    trainer = Trainer(model, opts, stream, {"stage": 1, "step": 0, "elapsed": 0.0})
    set_attention(model.llm, a.attention)  # fixed here, whatever step_attention would pick in `setok train`
    stage1 = seconds_per_step(trainer.step_stage1, a.steps, a.warmup)
    trainer.state.update(stage=2, step=0)
    trainer.opt = trainer._optimizer(2)
    stage2 = seconds_per_step(trainer.step_stage2, a.steps, a.warmup)
    print(json.dumps({"precision": a.precision, "attention": a.attention, "compile": a.compile,
                      "stage1_s_per_step": round(stage1, 3), "stage2_s_per_step": round(stage2, 3),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
