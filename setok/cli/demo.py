"""`setok demo`: evaluate the reference checkpoint and show what it does on a few scenes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from setok.config import SHIPPED_CHECKPOINT
from setok.errors import InputError

log = logging.getLogger(__name__)

SHIPPED = SHIPPED_CHECKPOINT
PALETTE = np.random.default_rng(7).integers(40, 255, size=(512, 3)).astype(np.uint8)


def default_checkpoint(out: Path, echo: Callable[[str], None]) -> Path:
    if (SHIPPED / "model.safetensors").is_file():
        return SHIPPED
    # A source checkout without the shipped weights still demos: train the tiny preset (< 1 min).
    echo("no shipped checkpoint found; training the tiny preset first (under a minute)")
    from setok.train import TrainOptions, train

    return train(TrainOptions(preset="tiny", out=out / "tiny-checkpoint"))


def run_demo(ckpt: Path | None, out: Path, n: int, echo: Callable[[str], None]) -> dict:
    from setok.eval.evaluation import evaluate_checkpoint
    from setok.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt or default_checkpoint(out, echo)
    if not Path(ckpt).is_dir():
        raise InputError(f"--ckpt {ckpt}: no such checkpoint directory; expected one written by `setok train`")
    echo(f"checkpoint: {ckpt}")
    metrics = evaluate_checkpoint(ckpt, n=n)
    write_json(out / "metrics.json", metrics)
    echo(f"held-out metrics on {n} scenes:")
    for key in sorted(metrics):
        value = metrics[key]
        echo(f"  {key:26s} {value:.3f}" if isinstance(value, float) else f"  {key:26s} {value}")
    show_scenes(ckpt, out / "scenes.png", echo)
    bundle_demo(Path(ckpt), out, echo)
    int8_demo(Path(ckpt), out, echo)
    return metrics


def bundle_demo(ckpt: Path, out: Path, echo: Callable[[str], None], n_parity: int = 8) -> dict:
    """Export the checkpoint, run the bundle with the torch-free runtime, and print parity."""
    from setok.data.items import eval_items
    from setok.export.onnx import export_bundle
    from setok.export.parity import format_table, run_parity
    from setok.io import write_json
    from setok.runtime import Pipeline

    bundle = export_bundle(ckpt, out / "bundle")
    echo(f"exported the bundle to {bundle}")
    pipe = Pipeline.open(bundle)
    for i, it in enumerate(eval_items(2, seed=123)):
        vt = pipe.tokenize(it.image)
        cap = pipe.caption(vt)
        ms = {k: round(v * 1000, 1) for k, v in cap.timings.items()}
        echo(f"bundle scene {i}: {vt.num_tokens} tokens; caption: {cap.text}")
        echo(f"  per-stage ms: {ms}")
    result = run_parity(ckpt, bundle, n=n_parity)
    write_json(out / "parity.json", result)
    echo(f"parity, PyTorch vs ONNX Runtime on {n_parity} held-out scenes:")
    echo(format_table(result))
    return result


@torch.no_grad()
def show_scenes(ckpt: Path, png: Path, echo: Callable[[str], None], count: int = 4) -> None:
    """Per scene: the image, its token map, the reconstruction, the image generated from its
    caption and the referring-segmentation mask; plus the model's words next to the truth."""
    from setok.data.items import eval_items
    from setok.eval.ceiling import parse_caption
    from setok.eval.evaluation import to_unit, token_mask_pixels
    from setok.eval.judge import judge, read_image
    from setok.io import save_png
    from setok.model.encoder import preprocess
    from setok.model.setokim import Setokim

    model = Setokim.from_pretrained(ckpt)
    cfg = model.cfg.encoder
    items = eval_items(count, seed=123, size=cfg.image_size)
    px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), cfg)
    vt = model.vision(px)
    counts, assignment = vt.clusters.num_tokens, vt.clusters.assignment.numpy()
    recon = to_unit(model.vision.reconstruct(vt))
    gen = to_unit(model.vision.detokenizer(*model.generate_tokens([it.caption for it in items])))
    captions = model.caption(vt.tokens, counts)
    answers = model.answer(vt.tokens, counts, [it.qa[0][0] for it in items])
    exprs = [it.referring[0][0] for it in items]
    selected = model.segment_tokens(vt.tokens, counts, exprs)
    rows = []
    for i, it in enumerate(items):
        tokens_map = PALETTE[assignment[i]].reshape(cfg.grid, cfg.grid, 3)
        mask = token_mask_pixels(assignment[i], selected[i].numpy(), it.image, cfg.grid, cfg.patch_size)
        tiles = [it.image, _up(tokens_map, cfg.patch_size), _u8(recon[i]), _u8(gen[i]),
                 np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8)]
        row = np.concatenate([_up(t, 4) for t in tiles], 1)
        read = read_image(gen[i])
        verdict = judge(parse_caption(it.caption)[0], read)
        lines = ["judge read:"] + ([d.label() for d in read] or ["nothing"])
        lines.append(f"{verdict.exact}/{verdict.described} exactly right" + ("" if verdict.count_ok else f", {verdict.detected} seen"))
        rows += [row, _label_band(row.shape[1], 3 * row.shape[1] // len(tiles), lines)]
        echo(f"scene {i}: {int(counts[i])} tokens for {it.num_objects} objects")
        echo(f"  caption  truth: {it.caption}\n           model: {captions[i]}")
        echo(f"  question {it.qa[0][0]!r}: truth {it.qa[0][1]!r}, model {answers[i]!r}")
        echo(f"  segment  {exprs[i]!r}: mask of {int(selected[i].sum())} token(s)")
        echo(f"  generated, as the judge reads it: {'; '.join(d.label() for d in read) or 'nothing'}")
    save_png(png, np.concatenate(rows, 0))
    echo(f"saved {png} (columns: image, tokens, reconstruction, generated from caption, segmentation; "
         "under each generated image, what the object judge reads in it)")


def _label_band(width: int, x: int, lines: list[str], line_height: int = 12) -> np.ndarray:
    """A dark (h, width, 3) uint8 strip with `lines` of text starting at column x."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, line_height * len(lines) + 4), (16, 16, 16))
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((x + 2, 2 + k * line_height), line, fill=(230, 230, 230))
    return np.asarray(band)


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _up(x: np.ndarray, f: int) -> np.ndarray:
    return np.kron(x, np.ones((f, f, 1), dtype=np.uint8)).astype(np.uint8)


def int8_demo(ckpt: Path, out: Path, echo: Callable[[str], None], n_cal: int = 64, n_eval: int = 40) -> dict:
    """Calibrate the bundle to INT8 Q/DQ and show fp32 vs INT8 metrics and latency side by side."""
    from setok.calibration import calibrate_bundle
    from setok.eval.evaluation import evaluate_bundle
    from setok.io import write_json

    report = calibrate_bundle(out / "bundle", out / "bundle-int8", n=n_cal)
    fp32 = evaluate_bundle(out / "bundle", n=n_eval, seed=5)
    int8 = evaluate_bundle(out / "bundle-int8", n=n_eval, seed=5)
    write_json(out / "int8.json", {"calibration": report, "fp32": fp32, "int8": int8})
    echo(f"fp32 vs INT8 bundle on {n_eval} held-out scenes (ONNX Runtime, CPU):")
    for key in ("fg_ari", "tokens_mean", "vqa_accuracy", "caption_exact", "refseg_miou", "recon_psnr", "gen_psnr", "eval_seconds"):
        echo(f"  {key:16s} {fp32[key]:10.3f} {int8[key]:10.3f}")
    gate = report.get("task_gate", {})
    if gate:
        back = ", ".join(r["stage"] for r in gate["reverted"]) or "none"
        echo(f"task gate on {gate['n']} held-out scenes: {'passed' if gate['passed'] else 'FAILED'}; reverted to fp32: {back}")
    echo("per stage: INT8 output cosine vs fp32, latency fp32 -> INT8 (ms), what the bundle keeps:")
    for stage, r in report["stages"].items():
        kept = "fp32 (INT8 not faster here)" if "kept_float" in r else "INT8"
        if any(x["stage"] == stage for x in gate.get("reverted", [])):
            kept = "fp32 (task gate)"
        echo(f"  {stage:16s} cosine {r['cosine']:.5f}  {r['fp32_ms']:8.3f} -> {r['int8_ms']:8.3f}  {kept}")
    return {"fp32": fp32, "int8": int8}
