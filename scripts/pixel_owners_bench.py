"""Benchmark: `setok.runtime.masks.pixel_owners`, which draws a token result's masks (on first use), at the
shipped model's grid and at the real towers' (384 px / 16 px, 378 px / 14 px; 32 tokens). Median of
--runs calls on random pixels and clusterings; JSON on stdout.

    python scripts/pixel_owners_bench.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from setok.runtime.masks import pixel_owners, token_masks

GRIDS = {"64px_16x16_k8": (16, 4, 8), "384px_24x24_k32": (24, 16, 32), "378px_27x27_k32": (27, 14, 32)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    out = {}
    for name, (grid, patch, k) in GRIDS.items():
        size = grid * patch
        pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        assignment = rng.integers(0, k, grid * grid)
        owners_ms, masks_ms = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            owners = pixel_owners(assignment, pixels, grid, patch, k)
            owners_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            token_masks(owners, k)
            masks_ms.append((time.perf_counter() - t) * 1e3)
        out[name] = {"pixel_owners_ms": float(np.median(owners_ms)), "token_masks_ms": float(np.median(masks_ms))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
