"""Experiment (issue #20): which token bank makes generation draw what the caption says?

The checkpoint's own bank (if any) is switched off; each variant builds a bank from the model's
tokens of training scenes and snaps every generated token's content (dims 2:) onto its nearest,
in the bank's per-dimension std units (setok/model/bank.py), then scores generation on held-out
scenes with `setok eval`'s own batch evaluation. docs/generation.md "The token bank" has the table.

    python scripts/token_bank_probe.py setok/checkpoints/small --n 200 \\
        --variants none,raw,std,rand1024,km1024,md1024,km256 [--scenes 2000] [--seeds 0,1,2]

Variants: none (plain regression), raw (every bank token, plain L2), std (every bank token),
randK (K drawn at random), kmK (K k-means centres), mdK (the real token nearest each centre),
pureP (the tokens whose patches are at least P % one instance or the background).
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch

from setok.data.items import eval_items, item_stream
from setok.eval import evaluation as E
from setok.model.encoder import preprocess
from setok.model.losses import patch_labels
from setok.model.setokim import Setokim

KEYS = ("gen_colour", "gen_position", "gen_count", "gen_shape", "gen_all", "gen_psnr")


def all_tokens(model: Setokim, scenes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of tokens, D) of `scenes` training scenes (seed-0 stream, batches 0, 1, ...), and each
    token's purity: the largest share of its patches that one instance (or the background) holds."""
    stream, out, purity = item_stream("synthetic", model.cfg.encoder.image_size, 0), [], []
    for b in range(scenes // 100):
        items = stream.batch(b, 100)
        vt = model.vision(preprocess(torch.from_numpy(np.stack([it.image for it in items])), model.cfg.encoder))
        labels = patch_labels(torch.from_numpy(np.stack([it.instance_mask for it in items])), model.cfg.encoder.patch_size)
        for t, k, a, lab in zip(vt.tokens, vt.clusters.num_tokens.tolist(), vt.clusters.assignment, labels):
            out.append(t[:k])
            for j in range(k):
                mine = lab[a == j]  # (patches of token j,) instance ids
                purity.append(torch.bincount(mine).max().item() / max(len(mine), 1) if len(mine) else 0.0)
    return torch.cat(out), torch.tensor(purity)


def kmeans(x: torch.Tensor, k: int, iters: int = 15) -> torch.Tensor:
    c = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
    return c


def codes(variant: str, bank: torch.Tensor, std: torch.Tensor, purity: torch.Tensor) -> torch.Tensor:
    """(C, D - 2) the variant's bank content, unscaled."""
    content = bank[:, 2:]
    if variant in ("raw", "std"):
        return content
    if variant.startswith("pure"):  # pureP: the tokens whose purity is at least P %
        return content[purity >= int(variant[4:]) / 100]
    kind, k = re.fullmatch(r"(rand|km|md)(\d+)", variant).groups()
    k = int(k)
    if kind == "rand":
        return content[torch.randperm(len(content), generator=torch.Generator().manual_seed(0))[:k]]
    centres = kmeans(content / std, k)
    if kind == "km":
        return centres * std
    return content[torch.cdist(centres, content / std).argmin(1)]  # medoids


def snapped(generate, table: torch.Tensor, scale: torch.Tensor):
    def gen(self, captions):
        toks, counts = generate(self, captions)  # (B, T, D), (B,)
        b, t, d = toks.shape
        near = torch.cdist(toks[..., 2:].reshape(-1, d - 2) / scale, table / scale).argmin(-1)
        valid = (torch.arange(t)[None] < counts[:, None])[..., None]  # (B, T, 1)
        return torch.cat([toks[..., :2], torch.where(valid, table[near].reshape(b, t, d - 2), toks[..., 2:])], -1), counts
    return gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default="none,std")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = Setokim.from_pretrained(args.ckpt)
    model.bank = None  # the checkpoint's own bank off: the variants replace it
    bank, purity = all_tokens(model, args.scenes)
    std = bank[:, 2:].std(0) + 1e-6
    plain = Setokim.generate_tokens
    for seed in map(int, args.seeds.split(",")):
        items = eval_items(args.n, seed, model.cfg.encoder.image_size)
        for v in args.variants.split(","):
            table = None if v == "none" else codes(v, bank, std, purity)
            Setokim.generate_tokens = plain if table is None else snapped(plain, table, torch.ones_like(std) if v == "raw" else std)
            r = E.summarize(E.evaluate_rows(model, items))
            print(json.dumps({"seed": seed, "variant": v, "bank": len(bank) if table is None else len(table), **{k: round(r[k], 3) for k in KEYS}}))


if __name__ == "__main__":
    main()
