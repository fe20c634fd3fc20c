"""Experiment (issue #20, not shipped behaviour): do the vision tokens carry an object's shape?

recon_shape stops at the ceiling of one colour per 4-pixel patch (docs/generation.md), and a
detokenizer that paints inside the patch did not move it. Either the detokenizer cannot draw what
the tokens hold, or the tokens do not hold it. This probe asks the tokens directly: for every
object of a scene, the token owning most of its pixels' patches; a linear probe (softmax
regression, and a one-hidden-layer MLP, trained on --train scenes, tested on --test held-out
ones) reads the object's shape (5 classes) from that token, reported by size. The control reads it from the object's own mask at
patch resolution (the share of each patch it covers, a 6 x 6 window around its centre patch): what a
tokenizer that kept only its clusters' patch masks could know.

    python scripts/token_shape_probe.py setok/checkpoints/small --json probe.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging

import numpy as np
import torch

from setok.data.items import EVAL_SEED_BASE
from setok.data.scenes import SHAPES, make_scene
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim

log = logging.getLogger("token_shape_probe")
WINDOW = 6  # patches per side of the control's mask window


def objects_of(model: Setokim, seeds: list[int]):
    """Rows (token vector, patch-mask window, shape index, size) for every object of the scenes."""
    enc = model.cfg.encoder
    g, p = enc.grid, enc.patch_size
    rows = []
    for i in range(0, len(seeds), 50):
        scenes = [make_scene(s, enc.image_size) for s in seeds[i : i + 50]]
        px = preprocess(torch.from_numpy(np.stack([s.image for s in scenes])), enc)
        with torch.no_grad():
            vt = model.vision(px)
        for b, scene in enumerate(scenes):
            assign = vt.clusters.assignment[b].numpy()  # (N,)
            for k, obj in enumerate(scene.objects, start=1):
                cover = (scene.instance_mask == k).reshape(g, p, g, p).mean((1, 3))  # (G, G) share per patch
                if cover.max() == 0:
                    continue  # fully occluded
                owner = np.bincount(assign, weights=cover.reshape(-1)).argmax()
                cy, cx = int(obj.cy // p), int(obj.cx // p)
                lo = WINDOW - WINDOW // 2  # the window's first row / column in the padded cover
                window = np.pad(cover, WINDOW)[cy + lo : cy + lo + WINDOW, cx + lo : cx + lo + WINDOW]  # (6, 6)
                rows.append((vt.tokens[b, owner].numpy(), window.reshape(-1), SHAPES.index(obj.shape), obj.size))
    return rows


def fit_probe(x: np.ndarray, y: np.ndarray, hidden: int, steps: int = 500) -> torch.nn.Module:
    """Softmax regression (hidden 0) or a one-hidden-layer MLP on standardised inputs."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).float()
    torch.manual_seed(0)
    probe = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, len(SHAPES)))
             if hidden else torch.nn.Linear(x.shape[1], len(SHAPES)))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    yt = torch.from_numpy(y)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.norm = (mean, std)
    return probe


def accuracy(probe, x: np.ndarray, y: np.ndarray) -> float:
    mean, std = probe.norm
    with torch.no_grad():
        pred = probe(torch.from_numpy((x - mean) / std).float()).argmax(-1).numpy()
    return float((pred == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = Setokim.from_pretrained(args.checkpoint).eval()
    train = objects_of(model, [200_000 + i for i in range(args.train)])  # past the training steps' seeds
    test = objects_of(model, [EVAL_SEED_BASE + i for i in range(args.test)])
    result = {}
    for (name, col), (kind, hidden) in itertools.product((("token", 0), ("patch_mask", 1)), (("linear", 0), ("mlp", 256))):
        x, y = np.stack([r[col] for r in train]), np.array([r[2] for r in train])
        probe = fit_probe(x, y, hidden)
        for size in ("small", "large", "all"):
            pick = [r for r in test if size in ("all", r[3])]
            result[f"{name}_{kind}_{size}"] = accuracy(probe, np.stack([r[col] for r in pick]), np.array([r[2] for r in pick]))
    result["objects_train_test"] = [len(train), len(test)]
    log.info("%s", result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
