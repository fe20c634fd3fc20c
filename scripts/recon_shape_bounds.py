"""Experiment (issue #20): how much shape can a reconstruction keep at a given painting granularity?

The judge's recon_shape on idealised reconstructions of the true image (each p x p block painted in
its mean colour; Gaussian blurs), beside the checkpoint's own reconstructions from its tokens, on
held-out scenes the judge reads exactly; and, for the checkpoint, which shape the judge reads for
each described shape and size (the described object's colour and cell, "missing" when none).

    python scripts/recon_shape_bounds.py setok/checkpoints/small --n 200 --json bounds.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from setok.data.items import eval_items
from setok.eval.ceiling import parse_caption
from setok.eval.evaluation import to_unit
from setok.eval.judge import judge, read_image
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim

log = logging.getLogger("recon_shape_bounds")


def block_mean(image: np.ndarray, p: int) -> np.ndarray:
    """(H, W, 3) uint8 -> each p x p block in its mean colour, float in [0, 1]."""
    h, w, _ = image.shape
    x = image.astype(np.float32).reshape(h // p, p, w // p, p, 3).mean((1, 3))  # (H/p, W/p, 3)
    return np.repeat(np.repeat(x, p, 0), p, 1) / 255.0


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(gaussian_filter(image.astype(np.float32) / 255.0, (sigma, sigma, 0)), 0, 1)


def reconstructions(model: Setokim, images: np.ndarray) -> list[np.ndarray]:
    out = []
    for i in range(0, len(images), 50):
        px = preprocess(torch.from_numpy(images[i : i + 50]), model.cfg.encoder)
        with torch.no_grad():
            vt = model.vision(px)
            out += list(to_unit(model.vision.detokenizer(vt.tokens, vt.clusters.num_tokens)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = Setokim.from_pretrained(args.checkpoint).eval()
    size, patch = model.cfg.encoder.image_size, model.cfg.encoder.patch_size
    items = eval_items(args.n, seed=args.seed, size=size)
    recons = reconstructions(model, np.stack([it.image for it in items]))
    forms = {f"block{patch}_mean": lambda im, r: block_mean(im, patch), "block2_mean": lambda im, r: block_mean(im, 2),
             "blur_sigma1": lambda im, r: blur(im, 1.0), "blur_sigma0.7": lambda im, r: blur(im, 0.7),
             "checkpoint": lambda im, r: r}
    hits: dict[str, list[float]] = {k: [] for k in forms}
    read_as: collections.Counter = collections.Counter()
    for it, r in zip(items, recons):
        described = parse_caption(it.caption)[0]
        if not judge(described, read_image(it.image)).all_ok:
            continue
        for key, form in forms.items():
            v = judge(described, read_image(form(it.image, r)))
            hits[key] += [1.0] * v.shape + [0.0] * (len(described) - v.shape)
        detections = read_image(r)
        for o in described:
            got = next((d.shape for d in detections if d.color == o.color and d.position == o.position), "missing")
            read_as[f"{o.size} {o.shape} -> {got}"] += 1
    result = {"recon_shape": {k: round(float(np.mean(v)), 3) for k, v in hits.items()}, "objects": len(hits["checkpoint"]),
              "checkpoint_read_as": dict(sorted(read_as.items()))}
    log.info("%s", json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
