"""Experiment (issue #20, not shipped behaviour): can the detokenizer draw shapes from the tokens it has?

Reconstructions from a scene's own tokens come back as round blobs (recon_shape ~0.27). The
detokenizer's cross-attention picks, for each output patch, the tokens it paints from by a learned
*isotropic* Gaussian around each token's centroid (setok.model.detokenizer): whatever a token
carries, its footprint is a disc. This probe gives each token a shape field instead: the attention
logit also gets a term linear in the patch's offset from the token's centroid (the merger's own
Fourier offset code, 40 features: x, y and both diagonals at 5 frequencies), with weights read from
the token (zero-initialised, so step 0 is the shipped detokenizer). Everything before the detokenizer
stays frozen; the detokenizer alone is fine-tuned on reconstruction for --steps steps, the control
(`--variant plain`) the same steps without the field. Then recon_psnr and the judge's recon_shape /
recon_all on held-out scenes.

    python scripts/detok_shape_probe.py setok/checkpoints/small --variant field --steps 300 --json f.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from setok.data.items import eval_items, item_stream
from setok.eval.evaluation import to_unit
from setok.eval.judge import judge_rows
from setok.eval.metrics import psnr
from setok.model.detokenizer import Detokenizer
from setok.model.encoder import preprocess
from setok.model.setokim import Setokim

log = logging.getLogger("detok_shape_probe")
FIRST_STEP = 100_000  # training scenes past the 2,000 steps a checkpoint was trained on


def with_field(base: Detokenizer, cfg) -> Detokenizer:
    """The checkpoint's detokenizer plus the model's own shape field (zero-initialised: step 0 draws
    what the checkpoint draws)."""
    detok = Detokenizer(dataclasses.replace(cfg.detokenizer, shape_field=True), cfg.encoder, cfg.merger.token_dim)
    missing, unexpected = detok.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("field.") for k in missing), (missing, unexpected)
    return detok


def tokens_of(model: Setokim, images: np.ndarray):
    px = preprocess(torch.from_numpy(images), model.cfg.encoder)
    with torch.no_grad():
        vt = model.vision(px)
    return px, vt.tokens, vt.clusters.num_tokens


def finetune(model: Setokim, detok: Detokenizer, steps: int, batch: int, lr: float) -> list[float]:
    stream = item_stream("synthetic", model.cfg.encoder.image_size, 0)
    opt = torch.optim.AdamW(detok.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in tqdm(range(steps), desc="finetune", unit="step"):
        items = stream.batch(FIRST_STEP + step, batch)
        px, tokens, counts = tokens_of(model, np.stack([it.image for it in items]))
        loss = torch.nn.functional.mse_loss(detok(tokens, counts), px)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detok.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(model: Setokim, detok: Detokenizer, n: int, seed: int) -> dict[str, float]:
    rows: dict[str, list[float]] = {"recon_psnr": []}
    items = eval_items(n, seed=seed, size=model.cfg.encoder.image_size)
    for i in range(0, n, 50):
        part = items[i : i + 50]
        px, tokens, counts = tokens_of(model, np.stack([it.image for it in part]))
        with torch.no_grad():
            recon = to_unit(detok(tokens, counts))
        truth = to_unit(px)
        rows["recon_psnr"] += [psnr(r, t) for r, t in zip(recon, truth)]
        for it, r in zip(part, recon):
            for key, values in judge_rows(it.caption, it.image, r, r).items():
                if key in ("judgeable", "recon_shape", "recon_all"):
                    rows.setdefault(key, []).extend(values)
    return {k: float(np.mean(v)) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--variant", choices=["plain", "field"], default="field")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Setokim.from_pretrained(args.checkpoint).eval()
    model.requires_grad_(False)
    base = model.vision.detokenizer
    if args.variant == "field" and base.field is not None:
        raise SystemExit(f"{args.checkpoint} already has a shape field; --variant plain fine-tunes it as it is")
    detok = with_field(base, model.cfg) if args.variant == "field" else base
    detok.requires_grad_(True)
    start = time.monotonic()
    result = {"variant": args.variant, "steps": args.steps, "lr": args.lr, "before": evaluate(model, base, args.n, args.seed)}
    log.info("before: %s", result["before"])
    detok.train()
    losses = finetune(model, detok, args.steps, args.batch, args.lr)
    detok.eval()
    result["after"] = evaluate(model, detok, args.n, args.seed)
    result["loss_first_last_50"] = [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))]
    result["seconds"] = time.monotonic() - start
    log.info("after: %s", result["after"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
