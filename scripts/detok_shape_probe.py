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
recon_all on held-out scenes. `--variant paint` adds detail inside each patch on top of the field
(class Paint below; docs/generation.md "Painting inside the patch").

    python scripts/detok_shape_probe.py setok/checkpoints/small --variant field --steps 300 --json f.json
    python scripts/detok_shape_probe.py setok/checkpoints/small --variant paint --steps 300 --paint-lr 1e-2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from setok.data.items import eval_items, item_stream
from setok.eval.evaluation import to_unit
from setok.eval.judge import judge, judge_rows, parse_caption, read_image
from setok.eval.metrics import psnr
from setok.model.detokenizer import Detokenizer
from setok.model.encoder import preprocess
from setok.model.layers import unpatchify
from setok.model.merger import patch_coords
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


class Paint(torch.nn.Module):
    """`--variant paint` (measured, not kept in the model): the detail inside each patch. Each
    token's colour is what the detokenizer's head painted where the token owns the patches (a
    softmax over the tokens of its cross-attention's own locality and shape-field logits, mixed
    over heads); k x k points per patch are owned by the same logits evaluated at the point itself,
    sharpened, and painted in their tokens' colours, minus the mean over each patch (the patch
    colours stay the head's). Gain, sharpness and head mix learn it; the gain starts at 0."""

    def __init__(self, detok: Detokenizer, subdiv: int, enc):
        super().__init__()
        self.detok, self.k, self.grid, self.patch = detok, subdiv, enc.grid, enc.patch_size
        self.register_buffer("points", patch_coords(enc.grid * subdiv), persistent=False)  # (P, 2)
        self.mix = torch.nn.Parameter(torch.zeros(detok.heads))  # softmax-ed: padding stays at -1e4
        self.sharpness = torch.nn.Parameter(torch.zeros(()))  # log of the points' logit scale
        self.gain = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        image = self.detok(tokens, num_tokens)  # (B, 3, H, W)
        b, g, k, up = image.shape[0], self.grid, self.k, self.patch // self.k
        mix = self.mix.softmax(0).view(1, -1, 1, 1)
        own = (self.detok.cross_bias(tokens, num_tokens) * mix).sum(1).softmax(-1)  # (B, N, T)
        patch_rgb = image.reshape(b, 3, g, self.patch, g, self.patch).mean((3, 5)).flatten(2)  # (B, 3, N)
        colour = (patch_rgb @ own) / own.sum(1, keepdim=True).clamp_min(1e-6)  # (B, 3, N) @ (B, N, T) -> (B, 3, T)
        at_points = (self.detok.cross_bias(tokens, num_tokens, self.points) * mix).sum(1)  # (B, P, T)
        painted = colour @ (at_points * self.sharpness.exp()).softmax(-1).transpose(1, 2)  # (B, 3, T) @ (B, T, P)
        cells = painted.reshape(b, 3, g, k, g, k)  # (B, 3, P) -> (B, 3, G, k, G, k): points by patch
        detail = self.gain * (cells - cells.mean((3, 5), keepdim=True))  # zero mean over each patch
        if up > 1:
            detail = detail.reshape(b, 3, g * k, 1, g * k, 1).expand(-1, -1, -1, up, -1, up)
        return image + detail.reshape(b, 3, g * self.patch, g * self.patch)


class Refine(torch.nn.Module):
    """`--variant refine`: the detokenizer's patch image plus a refinement at k x k points per patch.
    Each point is a query (its patch's output feature and a learned code of its place in the patch)
    that cross-attends to the tokens with the detokenizer's own locality, reach and shape field
    evaluated at the point (so a token's footprint is drawn at sub-patch scale), then an MLP paints
    its colour. The MLP's last layer starts at zero: step 0 draws what the checkpoint draws."""

    def __init__(self, detok: Detokenizer, subdiv: int, enc, token_dim: int, width: int = 64):
        super().__init__()
        self.detok, self.k, self.grid, self.patch = detok, subdiv, enc.grid, enc.patch_size
        g, k = enc.grid, subdiv
        # Points in patch-major order: point j of patch i sits at patch i's corner + j's offset.
        sub = (torch.arange(k, dtype=torch.float32) + 0.5) / (k * g)  # (k,)
        sy, sx = torch.meshgrid(sub, sub, indexing="ij")
        corner = patch_coords(g) - 0.5 / g  # (N, 2)
        pts = corner.unsqueeze(1) + torch.stack([sx.reshape(-1), sy.reshape(-1)], -1)  # (N, k*k, 2)
        self.register_buffer("points", pts.reshape(-1, 2), persistent=False)  # (N*k*k, 2)
        w = detok.norm.normalized_shape[0]
        self.sub_pos = torch.nn.Parameter(torch.randn(k * k, w) * 0.02)
        self.q = torch.nn.Linear(w, width)
        self.kv = torch.nn.Linear(token_dim, 2 * width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(w + width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, 3))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)
        self.heads = detok.heads

    def forward(self, tokens: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        x = self.detok.features(tokens, num_tokens)  # (B, N, W)
        image = unpatchify(self.detok.head(x), self.patch)  # (B, 3, H, W)
        b, n, w = x.shape
        kk, h = self.k * self.k, self.heads
        pq = (x.unsqueeze(2) + self.sub_pos).reshape(b, n * kk, w)  # (B, N*k*k, W)
        q = self.q(pq).reshape(b, n * kk, h, -1).transpose(1, 2)  # (B, h, P, c)
        k_, v = self.kv(tokens).reshape(b, tokens.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)  # 2 x (B, h, T, c)
        bias = self.detok.cross_bias(tokens, num_tokens, self.points)  # (B, h, P, T)
        att = torch.nn.functional.scaled_dot_product_attention(q, k_, v, attn_mask=bias)  # (B, h, P, c)
        att = att.transpose(1, 2).reshape(b, n * kk, -1)  # (B, P, width)
        rgb = self.mlp(torch.cat([pq, att], -1))  # (B, P, 3)
        g, k, up = self.grid, self.k, self.patch // self.k
        cells = rgb.reshape(b, g, g, k, k, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, G, k, G, k)
        if up > 1:
            cells = cells.reshape(b, 3, g, k, 1, g, k, 1).expand(-1, -1, -1, -1, up, -1, -1, up)
        return image + cells.reshape(b, 3, g * self.patch, g * self.patch)


def colour_codebook(model: Setokim, k: int, scenes: int = 256, iters: int = 20) -> torch.Tensor:
    """(k, 3) object colours in the encoder's normalised pixel space, found by k-means over the
    object pixels (instance mask > 0) of training scenes: learned from the data, not the generator's palette."""
    items = item_stream("synthetic", model.cfg.encoder.image_size, 0).batch(FIRST_STEP - 1, scenes)
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), model.cfg.encoder)  # (S, 3, H, W)
    mask = torch.from_numpy(np.stack([it.instance_mask for it in items])) > 0  # (S, H, W)
    pts = px.permute(0, 2, 3, 1)[mask]  # (P, 3)
    centres = pts[torch.randint(len(pts), (1,))]
    while len(centres) < k:  # farthest-point start: every colour gets a centre
        centres = torch.cat([centres, pts[torch.cdist(pts, centres).min(1).values.argmax()][None]])
    for _ in range(iters):
        near = torch.cdist(pts, centres).argmin(1)
        centres = torch.stack([pts[near == j].mean(0) for j in range(k)])
    return centres


class Palette(torch.nn.Module):
    """`--variant palette`: a discrete decoder beside the regression. Per pixel, logits over
    background + k colour codes (colour_codebook) from the detokenizer's patch features; trained by
    cross-entropy against the pixel's class (background where the instance mask is 0, else its
    nearest code). The image is the regression head's where background wins and the code's colour
    elsewhere: no pixel is ever an average of two colours, so no blended fringe."""

    def __init__(self, detok: Detokenizer, codebook: torch.Tensor, enc):
        super().__init__()
        self.detok, self.patch = detok, enc.patch_size
        self.register_buffer("codebook", codebook)  # (k, 3)
        w = detok.norm.normalized_shape[0]
        self.cls = torch.nn.Linear(w, self.patch * self.patch * (len(codebook) + 1))
        torch.nn.init.zeros_(self.cls.weight)  # step 0: background everywhere, i.e. the regression's image
        with torch.no_grad():
            self.cls.bias.copy_(torch.tensor([3.0] + [0.0] * len(codebook)).repeat(self.patch * self.patch))

    def logits(self, tokens: torch.Tensor, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.detok.features(tokens, num_tokens)  # (B, N, W)
        rgb = unpatchify(self.detok.head(x), self.patch)  # (B, 3, H, W)
        c = len(self.codebook) + 1
        b, n, _ = x.shape
        g, p = math.isqrt(n), self.patch
        per = self.cls(x).reshape(b, g, g, p, p, c)  # (B, N, p*p*(k+1)) -> (B, G, G, p, p, k+1), as unpatchify lays out a patch
        lg = per.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, k+1, H, W)
        return rgb, lg

    def forward(self, tokens: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        rgb, lg = self.logits(tokens, num_tokens)
        cls = lg.argmax(1)  # (B, H, W)
        code = self.codebook[(cls - 1).clamp_min(0)].permute(0, 3, 1, 2)  # (B, 3, H, W)
        return torch.where((cls > 0).unsqueeze(1), code, rgb)

    def loss(self, tokens, num_tokens, px, masks) -> torch.Tensor:
        rgb, lg = self.logits(tokens, num_tokens)
        near = torch.cdist(px.permute(0, 2, 3, 1).reshape(-1, 3), self.codebook).argmin(1).reshape(masks.shape) + 1
        target = torch.where(masks > 0, near, torch.zeros_like(near))  # (B, H, W): 0 background, 1..k codes
        return torch.nn.functional.mse_loss(rgb, px) + torch.nn.functional.cross_entropy(lg, target)


def tokens_of(model: Setokim, images: np.ndarray):
    px = preprocess(torch.from_numpy(images), model.cfg.encoder)
    with torch.no_grad():
        vt = model.vision(px)
    return px, vt.tokens, vt.clusters.num_tokens


def gradient_loss(pred: torch.Tensor, truth: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """MSE plus the L1 of the difference of the images' horizontal and vertical gradients (the
    gradient-difference loss of Mathieu et al. 2016): a blurred edge costs what a misplaced one does."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    gdl = (dx(pred) - dx(truth)).abs().mean() + (dy(pred) - dy(truth)).abs().mean()
    return torch.nn.functional.mse_loss(pred, truth) + weight * gdl


def finetune(model: Setokim, detok: torch.nn.Module, steps: int, batch: int, lr: float, paint_lr: float,
             loss_fn=torch.nn.functional.mse_loss) -> list[float]:
    stream = item_stream("synthetic", model.cfg.encoder.image_size, 0)
    # The paint starts at zero colours: its field gets no gradient until they grow, so it has its own rate.
    paint = [p for n, p in detok.named_parameters() if not n.startswith("detok.")] if isinstance(detok, (Paint, Refine, Palette)) else []
    rest = [p for p in detok.parameters() if all(p is not q for q in paint)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": paint, "lr": paint_lr}], lr=lr, weight_decay=0.01)
    losses = []
    for step in tqdm(range(steps), desc="finetune", unit="step"):
        items = stream.batch(FIRST_STEP + step, batch)
        px, tokens, counts = tokens_of(model, np.stack([it.image for it in items]))
        if isinstance(detok, Palette):
            loss = detok.loss(tokens, counts, px, torch.from_numpy(np.stack([it.instance_mask for it in items])))
        else:
            loss = loss_fn(detok(tokens, counts), px)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detok.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(model: Setokim, detok: torch.nn.Module, n: int, seed: int) -> dict[str, float]:
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
            described = parse_caption(it.caption)[0]
            if judge(described, read_image(it.image)).all_ok:  # the scene-level count, as gen_count reads it
                rows.setdefault("recon_count", []).append(float(judge(described, read_image(r)).count_ok))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--variant", choices=["plain", "field", "paint", "refine", "palette"], default="field")
    ap.add_argument("--subdiv", type=int, default=4, help="--variant paint: points per patch side")
    ap.add_argument("--codes", type=int, default=8, help="--variant palette: colour codes (k-means over object pixels)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--paint-lr", type=float, default=3e-4, help="the in-patch paint's own rate")
    ap.add_argument("--loss", choices=["mse", "l1", "gdl"], default="mse",
                    help="l1: the per-pixel median, not the mean, of what the tokens leave uncertain; gdl: MSE plus "
                         "a gradient-difference term (both: crisper edges)")
    ap.add_argument("--gdl-weight", type=float, default=1.0)
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
    if args.variant == "paint":
        detok = Paint(detok if base.field is not None else with_field(base, model.cfg), args.subdiv, model.cfg.encoder)
    if args.variant == "refine":
        detok = Refine(detok, args.subdiv, model.cfg.encoder, model.cfg.merger.token_dim)
    if args.variant == "palette":
        detok = Palette(detok, colour_codebook(model, args.codes), model.cfg.encoder)
    detok.requires_grad_(True)
    if isinstance(detok, Palette):
        detok.codebook.requires_grad_(False)
    start = time.monotonic()
    result = {"variant": args.variant, "loss": args.loss, "steps": args.steps, "lr": args.lr, "paint_lr": args.paint_lr, "before": evaluate(model, base, args.n, args.seed)}
    log.info("before: %s", result["before"])
    detok.train()
    loss_fn = {"mse": torch.nn.functional.mse_loss, "l1": torch.nn.functional.l1_loss,
               "gdl": lambda p, t: gradient_loss(p, t, args.gdl_weight)}[args.loss]
    losses = finetune(model, detok, args.steps, args.batch, args.lr, args.paint_lr, loss_fn)
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
