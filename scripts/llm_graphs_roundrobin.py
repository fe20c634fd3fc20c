"""Decode ms/token of several llm graphs under plain ONNX Runtime (spinning threads, as the peers run),
round-robin, plus the runtime's own OrtDecoder on one bundle with and without shared past/present
buffers: separates the graph's cost from the harness's (issue #17, docs/quantization.md).

    python scripts/llm_graphs_roundrobin.py --embeddings BUNDLE/llm_embeddings.npy \\
        --graph ours=GQ/llm.int4.onnx --graph genai=/tmp/peers/genai-int4/model.onnx ... [--bundle GQ]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import fuse_llm_experiment as F  # its session, tokens and round-robin bench
from llm_long_decode import run  # the runtime decoder's timed greedy loop

from setok import manifest as M
from setok.backends.onnxrt.session import OrtBackend


def decoder_ms(bundle: Path, prompt: np.ndarray, table: np.ndarray, steps: int, rounds: int) -> dict[str, float]:
    entry = M.load_manifest(bundle).stage("llm")
    backend = OrtBackend(bundle / entry.file, entry, threads=2)
    return {f"ortdecoder_shared={share}": statistics.median(run(backend, table, prompt, steps, share) for _ in range(rounds))
            for share in (True, False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=40)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    paths = {k: Path(v) for k, v in (g.split("=", 1) for g in args.graph)}
    table = np.load(args.embeddings, mmap_mode="r")
    emb = F.tokens(args.embeddings, args.prefill + args.steps, 0, vocab=table.shape[0])
    res = F.bench(paths, emb, threads=2, rounds=args.rounds, prefill=args.prefill, steps=args.steps)
    out = {"plain_ort_ms_per_token": {k: v["median_ms_per_token"] for k, v in res["variants"].items()},
           "loadavg_per_round": res["loadavg_1min_per_round"]}
    if args.bundle:
        out.update(decoder_ms(args.bundle, emb.emb[:, :args.prefill], table, args.steps, args.rounds))
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
