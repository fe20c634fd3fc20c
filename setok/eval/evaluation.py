"""`setok eval`: every metric of a checkpoint on held-out scenes (seeds disjoint from training)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from setok.data.items import SceneStream, TrainItem, eval_items
from setok.eval.ceiling import gen_ceiling_psnr
from setok.eval.judge import JUDGE_KEYS, judge_rows
from setok.eval.metrics import fg_ari, flat_baseline_psnr, iou, psnr, spearman
from setok.model.cluster import dpc_knn
from setok.model.encoder import preprocess
from setok.model.layers import patchify, sincos_2d
from setok.model.losses import patch_labels
from setok.model.setokim import Setokim
from setok.runtime.masks import pixel_owners

log = logging.getLogger(__name__)


def to_unit(x: torch.Tensor) -> np.ndarray:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) in [0, 1]."""
    return (x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def token_mask_pixels(assignment: np.ndarray, selected: np.ndarray, pixels: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """Union of the selected tokens' clusters at pixel resolution: (N,) ids, (K,) bool and the
    (H, W, 3) image -> (H, W) bool (see setok/runtime/masks.py)."""
    return selected[pixel_owners(assignment, pixels, grid, patch, len(selected))]


def patch_mask_pixels(assignment: np.ndarray, selected: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """The same at patch resolution (4x4-pixel steps): reported as refseg_miou_patch."""
    patches = selected[assignment].reshape(grid, grid)
    return np.kron(patches, np.ones((patch, patch), dtype=bool)).astype(bool)


@torch.no_grad()
def evaluate_checkpoint(ckpt: str | Path, n: int = 500, seed: int = 0, batch: int = 50) -> dict:
    model = Setokim.from_pretrained(ckpt)
    items = eval_items(n, seed, model.cfg.encoder.image_size)
    start = time.monotonic()
    result = summarize(evaluate_rows(model, items, batch))
    result["pixel_dpc_fg_ari"] = pixel_dpc_fg_ari(items, model.cfg)
    result["gen_ceiling_psnr"] = gen_ceiling_psnr([it.caption for it in items], [it.image for it in items])
    result.update(patches=model.cfg.encoder.num_patches, n=n, seed=seed, tokenizer=model.cfg.tokenizer,
                  tau=model.cfg.cluster.tau, eval_seconds=round(time.monotonic() - start, 1))
    return result


def evaluate_rows(model: Setokim, items: list[TrainItem], batch: int = 50) -> dict[str, list[float]]:
    """Every key's per-scene (or per-object) values over `items`, `batch` scenes at a time."""
    from tqdm.auto import tqdm

    rows: dict[str, list[float]] = {}
    for i in tqdm(range(0, len(items), batch), desc="eval", unit="batch", dynamic_ncols=True):
        for key, values in evaluate_batch(model, items[i : i + batch]).items():
            rows.setdefault(key, []).extend(values)
    return rows


def summarize(rows: dict[str, list[float]]) -> dict:
    out = {k: float(np.mean(v)) for k, v in rows.items() if k not in ("tokens", "objects") and v}
    for key in JUDGE_KEYS:  # over judgeable scenes only: null when no scene was judgeable
        out.setdefault(key, None)
    out["tokens_mean"] = float(np.mean(rows["tokens"]))
    out["tokens_objects_spearman"] = spearman(rows["tokens"], rows["objects"])
    return out


def evaluate_batch(model: Setokim, items: list[TrainItem]) -> dict[str, list[float]]:
    cfg = model.cfg
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), cfg.encoder)
    vt = model.vision(px)
    tokens, counts = vt.tokens, vt.clusters.num_tokens
    assignment = vt.clusters.assignment.numpy()
    labels = patch_labels(torch.from_numpy(np.stack([it.instance_mask for it in items])), cfg.encoder.patch_size).numpy()
    truth = to_unit(px)
    recon = to_unit(model.vision.reconstruct(vt))
    gen_tokens, gen_counts = model.generate_tokens([it.caption for it in items])
    generated = to_unit(model.vision.detokenizer(gen_tokens, gen_counts))
    captions = model.caption(tokens, counts)
    out = {
        "fg_ari": [fg_ari(a, l) for a, l in zip(assignment, labels)],
        "tokens": counts.tolist(),
        "objects": [it.num_objects for it in items],
        "recon_psnr": [psnr(r, t) for r, t in zip(recon, truth)],
        "baseline_psnr": [flat_baseline_psnr(t) for t in truth],
        "gen_psnr": [psnr(g, t) for g, t in zip(generated, truth)],
        "caption_exact": [float(c == it.caption) for c, it in zip(captions, items)],
    }
    for it, r, g in zip(items, recon, generated):
        for key, values in judge_rows(it.caption, it.image, r, g).items():
            out.setdefault(key, []).extend(values)
    out["vqa_accuracy"] = _vqa(model, tokens, counts, items)
    out["refseg_miou"], out["refseg_miou_patch"] = _refseg(model, tokens, counts, assignment, items, truth)
    return out


def _vqa(model: Setokim, tokens, counts, items: list[TrainItem]) -> list[float]:
    idx = [(i, q, a) for i, it in enumerate(items) for q, a in it.qa]
    rows = torch.tensor([i for i, _, _ in idx])
    answers = model.answer(tokens[rows], counts[rows], [q for _, q, _ in idx])
    return [float(p == a) for p, (_, _, a) in zip(answers, idx)]


def _refseg(model: Setokim, tokens, counts, assignment: np.ndarray, items: list[TrainItem],
            pixels: np.ndarray) -> tuple[list[float], list[float]]:
    cfg = model.cfg.encoder
    idx = [(i, e, m) for i, it in enumerate(items) for e, m in it.referring]
    rows = torch.tensor([i for i, _, _ in idx])
    selections = model.segment_tokens(tokens[rows], counts[rows], [e for _, e, _ in idx])
    fine = [iou(token_mask_pixels(assignment[i], sel.numpy(), pixels[i], cfg.grid, cfg.patch_size), m)
            for sel, (i, _, m) in zip(selections, idx)]
    coarse = [iou(patch_mask_pixels(assignment[i], sel.numpy(), cfg.grid, cfg.patch_size), m)
              for sel, (i, _, m) in zip(selections, idx)]
    return fine, coarse


def pixel_features(px: torch.Tensor, cfg) -> torch.Tensor:
    """No learning: raw patch pixels, normalised like encoder features, plus the position code."""
    raw = patchify(px, cfg.encoder.patch_size)  # (B, N, p*p*3)
    pos = sincos_2d(cfg.encoder.grid, raw.shape[-1]) * cfg.encoder.pos_scale
    return F.layer_norm(raw, raw.shape[-1:]) + pos


@torch.no_grad()
def pixel_dpc_fg_ari(items: list[TrainItem], cfg) -> float:
    """The same clustering on raw pixels, with its tau chosen on training scenes the same way."""
    ccfg = dataclasses.replace(cfg.cluster, tau=_pixel_tau(json.dumps(cfg.to_dict(), sort_keys=True)))
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])))
    clusters = dpc_knn(pixel_features(px, cfg), ccfg)
    labels = patch_labels(torch.from_numpy(np.stack([it.instance_mask for it in items])), cfg.encoder.patch_size)
    return float(np.mean([fg_ari(a, l) for a, l in zip(clusters.assignment.numpy(), labels.numpy())]))


def evaluate_bundle(bundle: str | Path, n: int = 500, seed: int = 0, backend: str = "onnxruntime") -> dict:
    """The same metrics through the torch-free runtime, image by image."""
    from tqdm.auto import tqdm

    from setok.config import SetokimConfig
    from setok.runtime import Pipeline

    pipe = Pipeline.open(bundle, backend=backend)
    cfg = SetokimConfig.from_dict(pipe.manifest.config)
    items = eval_items(n, seed, cfg.encoder.image_size)
    start = time.monotonic()
    rows: dict[str, list[float]] = {}
    for it in tqdm(items, desc="eval", unit="image", dynamic_ncols=True):
        for key, values in evaluate_item(pipe, it, cfg).items():
            rows.setdefault(key, []).extend(values)
    result = summarize(rows)
    result["pixel_dpc_fg_ari"] = pixel_dpc_fg_ari(items, cfg)
    result["gen_ceiling_psnr"] = gen_ceiling_psnr([it.caption for it in items], [it.image for it in items])
    result.update(patches=cfg.encoder.num_patches, n=n, seed=seed, tokenizer=cfg.tokenizer, tau=cfg.cluster.tau,
                  backend=backend, eval_seconds=round(time.monotonic() - start, 1))
    return result


def evaluate_item(pipe, it: TrainItem, cfg) -> dict[str, list[float]]:
    vt = pipe.tokenize(it.image)
    labels = patch_labels(torch.from_numpy(it.instance_mask[None]), cfg.encoder.patch_size).numpy()[0]
    truth = it.image.astype(np.float64) / 255.0
    gen = pipe.generate_image(it.caption).image.astype(np.float64) / 255.0
    recon = pipe.reconstruct(vt).astype(np.float64) / 255.0
    segs = [(pipe.segment(vt, e), m) for e, m in it.referring]
    enc = cfg.encoder
    return judge_rows(it.caption, it.image, recon, gen) | {
        "fg_ari": [fg_ari(vt.assignment, labels)],
        "tokens": [vt.num_tokens],
        "objects": [it.num_objects],
        "recon_psnr": [psnr(recon, truth)],
        "baseline_psnr": [flat_baseline_psnr(truth)],
        "gen_psnr": [psnr(gen, truth)],
        "caption_exact": [float(pipe.caption(vt).text == it.caption)],
        "vqa_accuracy": [float(pipe.answer(vt, q).text == a) for q, a in it.qa],
        "refseg_miou": [iou(seg.mask, m) for seg, m in segs],
        "refseg_miou_patch": [iou(patch_mask_pixels(vt.assignment, seg.selected, enc.grid, enc.patch_size), m) for seg, m in segs],
    }


@functools.lru_cache(maxsize=8)
def _pixel_tau(cfg_json: str) -> float:
    """tau for the pixel baseline: depends only on the config, so one calibration per process."""
    from setok.config import SetokimConfig
    from setok.train.tau import calibrate_tau

    cfg = SetokimConfig.from_dict(json.loads(cfg_json))

    class _PixelEncoder(torch.nn.Module):  # calibrate_tau expects `.encoder(pixel_values)`
        def forward(self, px):
            return pixel_features(px, cfg)

    holder = torch.nn.Module()
    holder.encoder = _PixelEncoder()
    return calibrate_tau(holder, SceneStream(cfg.encoder.image_size, 0).batch(10**6, 64), cfg)
