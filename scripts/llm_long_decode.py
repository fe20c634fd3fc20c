"""Decode ms/token of a bundle's llm stage at a long context, through the runtime's own OrtDecoder:
a P-token prefill of random embedding rows, then N greedy steps; for a GroupQueryAttention bundle both
with the past/present buffers shared (the default) and without (`decoder.share = False`: each step's
present is a new tensor, the past copied into it), round-robin over R rounds, medians (issue #17).

    python scripts/llm_long_decode.py BUNDLE [--prefill 1024] [--steps 32] [--threads 2] [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from setok import manifest as M
from setok.backends.onnxrt.session import OrtBackend


def run(backend: OrtBackend, table: np.ndarray, prompt: np.ndarray, steps: int, share: bool) -> float:
    decoder = backend.decoder(1)
    decoder.share = share and decoder.share
    logits, _ = decoder.step(prompt)
    t = time.perf_counter()
    for _ in range(steps):
        logits, _ = decoder.step(table[[int(logits[0].argmax())]][None])
    decoder.close()
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manifest = M.load_manifest(args.bundle)
    entry = manifest.stage("llm")
    backend = OrtBackend(args.bundle / entry.file, entry, threads=args.threads)
    table = np.load(args.bundle / manifest.files["embeddings"]["file"], mmap_mode="r")
    ids = np.random.default_rng(0).integers(0, table.shape[0], args.prefill)
    prompt = np.ascontiguousarray(table[ids][None], np.float32)
    modes = {"shared": True, "copied": False} if entry.extra.get("attention") == M.GQA_ATTENTION else {"copied": False}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, share in modes.items():
            times[mode].append(run(backend, table, prompt, args.steps, share))
    out = {"bundle": str(args.bundle), "llm": entry.file, "attention": entry.extra.get("attention", "eager"),
           "prefill_tokens": args.prefill, "steps": args.steps, "threads": args.threads,
           **{f"{m}_ms_per_token": statistics.median(v) for m, v in times.items()}, "rounds_ms": times}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
