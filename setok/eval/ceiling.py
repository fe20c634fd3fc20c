"""The best `gen_psnr` any caption-conditioned generator can expect on the synthetic scenes.

A caption names each object's size class, colour, shape and 3x3 cell, and the background's
colour and kind. It leaves open where in its cell each object sits, its radius within the size
class, the gradient's direction and range (or the texture), and the pixel noise. Under squared
error the best single image for a caption is the expected image over everything it leaves open;
its PSNR against the true scene bounds what text -> image generation can score here. It is
computed from the caption alone, with the scene generator's own distributions: each described
object's probability of covering a pixel and each background kind's mean brightness are Monte
Carlo averages (cached per process), composited in closed form.

Approximations (each moves the estimate a little either way): objects are placed independently
and painted in caption order (the generator's paint order is not in the caption), and the
generator's rule that objects stay visible is not imposed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from setok.data import scenes as S
from setok.errors import InputError
from setok.eval.metrics import psnr


def _alt(words) -> str:
    """A regex alternation that tries longer words first ("top left" before "top")."""
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


SAMPLES = 512  # per (shape, size, cell) and per background kind; cached once per process
_OBJECT = re.compile(rf"a ({_alt(S.SIZES)}) ({_alt(S.COLORS)}) ({_alt(S.SHAPES)}) at ({_alt(S.POSITIONS)})")
_BACKGROUND = re.compile(rf" on a ({_alt(S.BACKGROUND_COLORS)}) ({_alt(S.BACKGROUND_KINDS)})$")


@dataclass(frozen=True)
class Described:
    """What a caption says about one object."""

    size: str
    color: str
    shape: str
    position: str


def parse_caption(caption: str) -> tuple[list[Described], str, str]:
    """A generator caption -> (objects, background colour name, background kind)."""
    bg = _BACKGROUND.search(caption)
    objects = [Described(*m.groups()) for m in _OBJECT.finditer(caption)]
    if bg is None or not objects:
        raise InputError(f"caption {caption!r}: expected the scene generator's form 'a SIZE COLOR SHAPE at POSITION, ... on a BACKGROUND KIND'")
    return objects, bg.group(1), bg.group(2)


def _draw_object(rng: np.random.Generator, o: Described, size: int) -> np.ndarray:
    """(H, W) bool mask of one placement of a described object."""
    r = rng.uniform(*S._RADIUS[o.size]) * size / 64
    row, col = divmod(S.POSITIONS.index(o.position), 3)
    # The generator draws the centre uniformly in [r, size - r]; the caption adds its cell.
    third = size / 3
    x_lo, x_hi = max(r, col * third), min(size - r, (col + 1) * third)
    y_lo, y_hi = max(r, row * third), min(size - r, (row + 1) * third)
    cx, cy = rng.uniform(x_lo, max(x_lo, x_hi)), rng.uniform(y_lo, max(y_lo, y_hi))
    return S.shape_mask(o.shape, cx, cy, r, size)


def sample_image(rng: np.random.Generator, caption: str, size: int = 64) -> np.ndarray:
    """One (H, W, 3) float image in [0, 255] consistent with the caption (no pixel noise)."""
    objects, bg_name, kind = parse_caption(caption)
    image = S.background_gain(rng, kind, size)[..., None] * np.asarray(S.BACKGROUND_COLORS[bg_name], np.float32)
    for o in objects:
        image[_draw_object(rng, o, size)] = S.COLORS[o.color]
    return image


def occupancy(o: Described, size: int) -> np.ndarray:
    """(H, W) probability that a described object covers each pixel (its colour plays no part)."""
    return _occupancy(o.size, o.shape, o.position, size)


@functools.lru_cache(maxsize=128)  # 2 sizes x 5 shapes x 9 cells = 90 per image size
def _occupancy(size_class: str, shape: str, position: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    o = Described(size_class, "", shape, position)
    return np.mean([_draw_object(rng, o, size) for _ in range(SAMPLES)], axis=0)


@functools.lru_cache(maxsize=8)
def mean_gain(kind: str, size: int) -> np.ndarray:
    """(H, W) expected brightness modulation of a background kind."""
    rng = np.random.default_rng(1)
    return np.mean([S.background_gain(rng, kind, size) for _ in range(SAMPLES)], axis=0)


def expected_image(caption: str, size: int = 64) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the mean image over what the caption leaves open, with objects
    placed independently and painted in caption order (later ones cover earlier ones)."""
    objects, bg_name, kind = parse_caption(caption)
    image = mean_gain(kind, size)[..., None] * np.asarray(S.BACKGROUND_COLORS[bg_name], np.float64)  # (H, W, 3)
    for o in objects:
        p = occupancy(o, size)[..., None]  # (H, W, 1)
        image = image * (1.0 - p) + p * np.asarray(S.COLORS[o.color], np.float64)
    return np.clip(image / 255.0, 0.0, 1.0)


def gen_ceiling_psnr(captions: list[str], images: list[np.ndarray]) -> float:
    """Mean PSNR of each caption's expected image against its true (H, W, 3) uint8 scene."""
    return float(np.mean([psnr(expected_image(c, img.shape[0]), img.astype(np.float64) / 255.0)
                          for c, img in zip(captions, images)]))
