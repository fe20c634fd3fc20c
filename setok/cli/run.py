"""`setok run`: one image (and/or one prompt) through a bundle; torch-free like the runtime.

Every position it reports is in the pixels of the image file as given (after EXIF rotation):
`frame_size`, `crop_box` and `scale` say where the encoder's square lies in it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from setok.errors import InputError
from setok.io import save_png
from setok.runtime.pipeline import Mask, Pipeline, Tokens

PALETTE = np.random.default_rng(7).integers(40, 255, size=(1024, 3)).astype(np.uint8)


def run_bundle(bundle: Path, image: Path | None, ask: str | None, expression: str | None, generate: str | None,
               save_masks: Path | None, save_image: Path | None, letterbox: bool = False) -> dict:
    if image is None and generate is None:
        raise InputError("nothing to do: pass --image (to tokenize, caption, --ask, --segment) and/or --generate")
    if image is None and (ask or expression or save_masks):
        raise InputError("--ask, --segment and --save-masks need --image")
    result: dict = {}
    with Pipeline.open(bundle, letterbox=True if letterbox else None) as pipe:
        if image is not None:
            vt = pipe.tokenize(image)
            result.update(num_tokens=vt.num_tokens, centers=vt.centers.tolist(), caption=pipe.caption(vt).text)
            result.update(vt.frame.to_dict())
            result["token_boxes"] = vt.boxes.tolist()
            result["token_centroids"] = [[round(float(v), 2) for v in c] for c in vt.centroids]
            seg = None
            if ask:
                result["answer"] = pipe.answer(vt, ask).text
            if expression:
                seg = pipe.segment(vt, expression)
                result.update(segment_tokens=np.flatnonzero(seg.selected).tolist(), segment_pixels=seg.area,
                              segment_box=list(seg.box) if seg.box else None,
                              segment_centroid=[round(v, 2) for v in seg.centroid] if seg.centroid else None)
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


def mask_panel(pipe: Pipeline, vt: Tokens, image, seg: Mask | None) -> np.ndarray:
    """Side by side, on the original frame: the frame, each token's region in its own colour (the
    part the encoder did not see dimmed), the segmentation. Frames up to 128 pixels are shown 4x."""
    from setok.runtime.preprocess import to_rgb_array

    rgb = vt.source.pixels if vt.source is not None and vt.source.pixels is not None else to_rgb_array(image, pipe.size)
    owners = vt.owners
    tokens = np.where((owners >= 0)[..., None], PALETTE[np.maximum(owners, 0) % len(PALETTE)], rgb // 4)
    tiles = [rgb, tokens.astype(np.uint8)]
    if seg is not None:
        tiles.append(np.where(seg.mask[..., None], rgb, rgb // 4).astype(np.uint8))
    panel = np.concatenate(tiles, 1)
    up = 4 if max(rgb.shape[:2]) <= 128 else 1
    return panel.repeat(up, 0).repeat(up, 1)
