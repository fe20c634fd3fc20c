"""Measurement (issue #20, docs/generation.md): the detokenizer's shape field at the real towers'
grids. The `small` preset's built-in tower at 384 px / 16 px patches (576 patches, as
SigLIP-B/16@384) and 378 px / 14 px (729, as SigLIP-so400m@384), random weights with a non-zero
shape field, saved as a checkpoint; then `setok export` and `setok parity --n 2` as subprocesses
(wall time and peak RSS from the OS), and the exported detokenizer's median run under ONNX Runtime
CPU (2 threads, one image, every token slot real; 100 runs after 10 warm-ups).

    python scripts/detok_real_grid.py --out /tmp/detok_real --json detok_real.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("detok_real_grid")
GRIDS = {"576": (384, 16), "729": (378, 14)}


def make_checkpoint(out: Path, image_size: int, patch: int) -> None:
    import torch

    from setok.config import SHIPPED_CHECKPOINT, preset
    from setok.model import text
    from setok.model.setokim import Setokim

    cfg = preset("small")
    cfg.encoder.image_size, cfg.encoder.patch_size = image_size, patch
    torch.manual_seed(0)
    model = Setokim(cfg, text.load_text_tokenizer(SHIPPED_CHECKPOINT))
    torch.nn.init.normal_(model.vision.detokenizer.field.weight, std=0.05)  # a field that draws something
    model.save_pretrained(out)


def timed_child(cmd: list[str]) -> dict[str, float]:
    """Run one setok command in a child under /usr/bin/time: its wall time and peak RSS."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], check=False, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    seconds, kb = proc.stderr.strip().splitlines()[-1].split()
    return {"seconds": float(seconds), "peak_rss_gb": int(kb) / 1e6}


def detok_ms(bundle: Path, token_dim: int, slots: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(bundle / "detokenizer.onnx"), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(1, slots, token_dim)).astype(np.float32)
    tokens[..., :2] = rng.uniform(size=(1, slots, 2))  # centroids in [0, 1]
    feeds = {sess.get_inputs()[0].name: tokens, sess.get_inputs()[1].name: np.array([slots], np.int64)}
    for _ in range(10):
        sess.run(None, feeds)
    runs = []
    for _ in range(100):
        t = time.perf_counter()
        sess.run(None, feeds)
        runs.append(time.perf_counter() - t)
    return float(np.median(runs) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {}
    for name, (size, patch) in GRIDS.items():
        root = Path(args.out) / name
        make_checkpoint(root / "ckpt", size, patch)
        export = timed_child(["setok", "export", str(root / "ckpt"), "--out", str(root / "bundle")])
        parity = timed_child(["setok", "parity", str(root / "ckpt"), str(root / "bundle"), "--n", "2",
                              "--json", str(root / "parity.json")])
        report = json.loads((root / "parity.json").read_text())
        result[name] = {"image_size": size, "patch_size": patch, "export": export, "parity_seconds": parity["seconds"],
                        "parity_peak_rss_gb": parity["peak_rss_gb"], "parity": report,
                        "detokenizer_ms": detok_ms(root / "bundle", 128, 32)}
        log.info("%s: export %.1f s, %.2f GB; parity %.1f s; detokenizer %.1f ms", name, export["seconds"],
                 export["peak_rss_gb"], parity["seconds"], result[name]["detokenizer_ms"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
