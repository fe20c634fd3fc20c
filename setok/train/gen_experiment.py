"""Experiment, not shipped behaviour: is the generator's position failure in the tokens' position
path? (issue #20's first idea; results in docs/generation.md).

A vision token's dims 0-1 are its cluster's centroid (x, y) in [0, 1] (setok.model.merger), and
the detokenizer places each token by them. Generation emits the described objects' tokens first,
in caption order (setok.train.sequences.generation_order). This probe keeps everything the LLM
regresses and only overwrites dims 0-1 of the first M slots (M objects described) with where the
caption puts each object: the centre of its 3x3 cell, moved inward where the generator's margin
(the object's radius) forbids part of an edge cell. No training; if the judge's gen_position
rises to the target, predicting dims 0-1 through the caption's cell (the projector's position
path) is worth training; if it does not, the detokenizer ignores or blurs the position.

It also measures how far the regressed centroids of those slots are from the true objects' token
centroids (the tokens of the scene's own image), in pixels.

    python -m setok.train.gen_experiment setok/checkpoints/small --n 200
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from setok.data import scenes as S
from setok.data.items import eval_items
from setok.eval.ceiling import parse_caption
from setok.eval.evaluation import to_unit
from setok.eval.judge import JUDGE_KEYS, judge_rows
from setok.eval.metrics import psnr
from setok.model.encoder import preprocess
from setok.model.losses import patch_labels
from setok.model.setokim import Setokim


def cell_centroid(size_class: str, position: str) -> tuple[float, float]:
    """Expected (x, y) in [0, 1] of an object the caption places in a cell (its centre is drawn
    uniformly in [r, 64 - r] per axis, restricted to the cell)."""
    r = float(np.mean(S._RADIUS[size_class]))
    row, col = divmod(S.POSITIONS.index(position), 3)

    def mid(i: int) -> float:
        lo, hi = max(r, i * 64 / 3), min(64 - r, (i + 1) * 64 / 3)
        return (lo + hi) / 2 / 64

    return mid(col), mid(row)


def true_object_centroids(assignment: np.ndarray, instance_mask: np.ndarray, patch: int, k: int) -> dict[int, np.ndarray]:
    """Per instance id, the centroid (dims 0-1 in [0, 1]) of its majority tokens' patches."""
    labels = patch_labels(torch.from_numpy(instance_mask)[None], patch)[0].numpy()  # (N,)
    grid = int(np.sqrt(len(labels)))
    xy = np.stack(np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid), -1).reshape(-1, 2)
    out = {}
    for obj in range(1, int(labels.max()) + 1):
        owners = [t for t in range(k) if np.any(assignment == t) and np.bincount(labels[assignment == t]).argmax() == obj]
        if owners:
            out[obj] = xy[np.isin(assignment, owners)].mean(0)
    return out


@torch.no_grad()
def run(ckpt: str, n: int = 200, seed: int = 0, batch: int = 50) -> dict:
    model = Setokim.from_pretrained(ckpt)
    enc = model.cfg.encoder
    items = eval_items(n, seed, enc.image_size)
    rows: dict[str, dict[str, list[float]]] = {"shipped": {}, "caption_centroids": {}}
    centroid_err: list[float] = []
    for i in range(0, n, batch):
        chunk = items[i : i + batch]
        tokens, counts = model.generate_tokens([it.caption for it in chunk])
        fixed = tokens.clone()
        for b, it in enumerate(chunk):
            for j, o in enumerate(parse_caption(it.caption)[0][: int(counts[b])]):
                fixed[b, j, :2] = torch.tensor(cell_centroid(o.size, o.position))
        px = preprocess(torch.from_numpy(np.stack([it.image for it in chunk])), enc)
        vt = model.vision(px)
        assignment = vt.clusters.assignment.numpy()
        for b, it in enumerate(chunk):
            truth = true_object_centroids(assignment[b], it.instance_mask, enc.patch_size, int(vt.clusters.num_tokens[b]))
            for j in range(min(int(counts[b]), it.num_objects)):
                if j + 1 in truth:
                    centroid_err.append(float(np.linalg.norm(tokens[b, j, :2].numpy() - truth[j + 1]) * enc.image_size))
        truth_img = [it.image.astype(np.float64) / 255.0 for it in chunk]
        recon = to_unit(model.vision.reconstruct(vt))
        for name, toks in (("shipped", tokens), ("caption_centroids", fixed)):
            gen = to_unit(model.vision.detokenizer(toks, counts))
            out = rows[name]
            for it, r, g, t in zip(chunk, recon, gen, truth_img):
                for key, values in judge_rows(it.caption, it.image, r, g).items():
                    out.setdefault(key, []).extend(values)
                out.setdefault("gen_psnr", []).append(psnr(g, t))
    result = {name: {k: (float(np.mean(v)) if v else None) for k, v in r.items() if k in (*JUDGE_KEYS, "gen_psnr")}
              for name, r in rows.items()}
    result["slot_centroid_error_px"] = {"mean": float(np.mean(centroid_err)), "median": float(np.median(centroid_err)),
                                        "objects": len(centroid_err)}
    result.update(n=n, seed=seed, ckpt=str(ckpt))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(run(args.ckpt, args.n, args.seed), indent=2))


if __name__ == "__main__":
    main()
