"""Time one prefill of an llm stage graph alone: N random embedding rows, empty past, ONNX Runtime
CPU, T intra-op threads, sequential; median of R runs after one warm-up (issue #17's prefill
comparison with onnxruntime-genai's 40-token prompt; `setok bench` times the real prompt instead).

    python scripts/llm_prefill.py BUNDLE/llm.int4.onnx BUNDLE/llm_embeddings.npy [--tokens 40] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph")
    ap.add_argument("embeddings")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(args.graph, opts, providers=["CPUExecutionProvider"])
    emb = np.load(args.embeddings, mmap_mode="r")
    ids = np.random.default_rng(0).integers(0, emb.shape[0], args.tokens)
    n = args.tokens
    feeds = {"inputs_embeds": np.ascontiguousarray(emb[ids][None], np.float32),
             "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n, dtype=np.int64)[None]}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)  # [B, kv_heads, 0, head_dim]
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        session.run(["logits"], feeds)
        times.append(1000 * (time.perf_counter() - t))
    print(json.dumps({"graph": args.graph, "tokens": n, "threads": args.threads,
                      "prefill_ms_median": float(np.median(times[1:])), "runs_ms": times}))


if __name__ == "__main__":
    main()
