"""`setok run`: one image (and/or one prompt) through a bundle; torch-free like the runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from setok.errors import InputError
from setok.io import save_png
from setok.runtime.pipeline import Pipeline

PALETTE = np.random.default_rng(7).integers(40, 255, size=(1024, 3)).astype(np.uint8)


def run_bundle(bundle: Path, image: Path | None, ask: str | None, expression: str | None, generate: str | None,
               save_masks: Path | None, save_image: Path | None) -> dict:
    if image is None and generate is None:
        raise InputError("nothing to do: pass --image (to tokenize, caption, --ask, --segment) and/or --generate")
    if image is None and (ask or expression or save_masks):
        raise InputError("--ask, --segment and --save-masks need --image")
    pipe = Pipeline.open(bundle)
    result: dict = {}
    if image is not None:
        vt = pipe.tokenize(image)
        result.update(num_tokens=vt.num_tokens, centers=vt.centers.tolist(), caption=pipe.caption(vt).text)
        seg = None
        if ask:
            result["answer"] = pipe.answer(vt, ask).text
        if expression:
            seg = pipe.segment(vt, expression)
            result.update(segment_tokens=np.flatnonzero(seg.selected).tolist(), segment_pixels=int(seg.mask.sum()))
        if save_masks:
            save_png(save_masks, mask_panel(pipe, vt, image, seg))
            result["masks_png"] = str(save_masks)
        result["timings"] = {k: round(v * 1000, 3) for k, v in vt.timings.items()}
    if generate:
        gen = pipe.generate_image(generate)
        result["generated_tokens"] = gen.num_tokens
        if save_image:
            save_png(save_image, gen.image)
            result["image_png"] = str(save_image)
    return result


def mask_panel(pipe: Pipeline, vt, image, seg) -> np.ndarray:
    """Side by side, 4x: the input, each token's region in its own colour, the segmentation."""
    from setok.runtime.preprocess import to_rgb_array

    rgb = to_rgb_array(image, pipe.size)
    tokens = PALETTE[vt.assignment].reshape(pipe.grid, pipe.grid, 3).repeat(pipe.patch, 0).repeat(pipe.patch, 1)
    tiles = [rgb, tokens]
    if seg is not None:
        tiles.append(np.where(seg.mask[..., None], rgb, rgb // 4).astype(np.uint8))
    panel = np.concatenate(tiles, 1)
    return panel.repeat(4, 0).repeat(4, 1)
