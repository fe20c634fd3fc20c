"""Deterministic synthetic scenes: shapes on a textured background, with caption, QA and referring
expressions that are exactly derivable from the scene (so a model can be scored on them exactly).

Everything is drawn from `np.random.default_rng(seed)`: the same seed gives a bit-identical Scene.
Training uses seeds in [TRAIN_SEED_BASE, EVAL_SEED_BASE); held-out scenes use seeds >= EVAL_SEED_BASE.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from setok.errors import InputError

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# Muted, dark colours (max channel <= ~110 even after modulation) so objects always stand out.
# None starts with a vowel, so the caption's fixed "on a {background}" stays grammatical.
BACKGROUND_COLORS = {
    "dark gray": (60, 60, 60),
    "brown": (90, 62, 40),
    "navy": (28, 34, 84),
    "teal": (28, 80, 80),
    "maroon": (84, 28, 38),
}
BACKGROUND_KINDS = ("gradient", "texture")

TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 2**30

MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 12
MIN_SIZE = 32  # below this a small star cannot reach MIN_VISIBLE_PIXELS
MAX_OBJECTS = 5  # count answers are the digits "1".."5"
_PLACEMENT_TRIES = 30
_RADIUS = {"small": (5.0, 7.0), "large": (10.0, 13.0)}  # pixels at 64 px, scaled by size/64
_NOISE = 8
_RELATION_GAP = 8.0  # pixels at 64 px: centers closer than this make left/above ambiguous


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float

    def name(self) -> str:
        """'red circle': unique within a scene by construction."""
        return f"{self.color} {self.shape}"

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at {self.position}"


@dataclass
class Scene:
    seed: int
    image: np.ndarray
    instance_mask: np.ndarray
    objects: list[SceneObject]
    background: str
    caption: str
    qa: list[tuple[str, str]]
    referring: list[tuple[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Rasterisation


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centers; cached because the trainer draws thousands of scenes of one size.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ys.setflags(write=False)
    xs.setflags(write=False)
    return xs, ys


def _star(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """5-pointed star, one point up: fold the angle into one half-spike and test one edge."""
    inner = 0.45 * r
    half = np.pi / 5  # 36 degrees between an outer point and the next inner vertex
    theta = np.arctan2(dx, -dy) % (2 * half)  # outer points at 0 and 2*half
    phi = half - np.abs(theta - half)  # angular distance to the nearest outer point
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    # Edge from outer point O=(r, 0) to inner vertex I; inside means same side as the origin.
    ix, iy = inner * np.cos(half), inner * np.sin(half)
    ex, ey = ix - r, iy
    return ex * py - ey * (px - r) >= 0.0


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Hard (H, W) bool mask of one shape of 'radius' r centered at (cx, cy)."""
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r  # a bit smaller so its area is close to the circle's
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Apex at (0, -r), base at dy = 0.8 r with half-width r.
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "star":
        return _star(dx, dy, 1.15 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    k = grid.shape[0]
    t = np.linspace(0.0, k - 1.0, size)
    i0 = np.minimum(t.astype(np.int64), k - 2)
    w = t - i0
    rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Float (H, W, 3) background and its description: one named muted colour, modulated."""
    names = list(BACKGROUND_COLORS)
    name = names[rng.integers(len(names))]
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    base = np.asarray(BACKGROUND_COLORS[name], np.float32)
    return background_gain(rng, kind, size)[..., None] * base, f"{name} {kind}"


def background_gain(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """(H, W) float32 brightness modulation of a background: what its description leaves open."""
    if kind == "gradient":
        xs, ys = _grid(size)
        a = rng.uniform(0, 2 * np.pi)
        proj = (xs - size / 2) * np.cos(a) + (ys - size / 2) * np.sin(a)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        lo, hi = rng.uniform(0.5, 0.75), rng.uniform(1.1, 1.3)
        gain = lo + (hi - lo) * t
    else:
        k = int(rng.choice((4, 8)))
        gain = _bilinear(rng.uniform(0.55, 1.3, size=(k, k)), size)
    return gain.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Placement


def _cell(cx: float, cy: float, size: int) -> str:
    col = min(int(cx * 3 / size), 2)
    row = min(int(cy * 3 / size), 2)
    return POSITIONS[row * 3 + col]


def _fits(new: np.ndarray, visible: list[np.ndarray], areas: list[int]) -> bool:
    """Would painting `new` on top keep every earlier object visible enough? Is `new` big enough?"""
    if new.sum() < MIN_VISIBLE_PIXELS:
        return False
    for vis, area in zip(visible, areas):
        left = int(np.count_nonzero(vis & ~new))
        if left < MIN_VISIBLE_PIXELS or left < MIN_VISIBLE_FRACTION * area:
            return False
    return True


def _place(rng: np.random.Generator, size: int, count: int):
    """Objects in paint order with their visible masks; an object that never fits is dropped."""
    scale = size / 64
    combos = rng.choice(len(SHAPES) * len(COLORS), size=count, replace=False)
    color_names = list(COLORS)
    placed, visible, areas = [], [], []
    for combo in combos:
        shape, color = SHAPES[combo // len(COLORS)], color_names[combo % len(COLORS)]
        for _ in range(_PLACEMENT_TRIES):
            sz = SIZES[rng.integers(len(SIZES))]
            r = rng.uniform(*_RADIUS[sz]) * scale
            cx, cy = rng.uniform(r, size - r, size=2)
            mask = shape_mask(shape, cx, cy, r, size)
            if _fits(mask, visible, areas):
                visible = [v & ~mask for v in visible]
                visible.append(mask)
                areas.append(int(mask.sum()))
                placed.append(SceneObject(shape, color, sz, _cell(cx, cy, size), float(cx), float(cy)))
                break
        else:
            log.debug("dropped a %s %s after %d placement tries", color, shape, _PLACEMENT_TRIES)
    return placed, visible


# ---------------------------------------------------------------------------------------------
# Text


def _caption(objects: list[SceneObject], background: str) -> str:
    phrases = [o.phrase() for o in objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body} on a {background}"


def _relations(rng: np.random.Generator, objects: list[SceneObject], gap: float) -> list:
    out = []
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            # Random order of the pair balances yes/no answers.
            if rng.random() < 0.5:
                a, b = b, a
            if abs(a.cx - b.cx) >= gap:
                out.append((f"is the {a.name()} left of the {b.name()}", "yes" if a.cx < b.cx else "no"))
            if abs(a.cy - b.cy) >= gap:
                out.append((f"is the {a.name()} above the {b.name()}", "yes" if a.cy < b.cy else "no"))
    return out


def _existence(rng: np.random.Generator, objects: list[SceneObject]) -> list:
    present = {(o.color, o.shape) for o in objects}
    o = objects[rng.integers(len(objects))]
    absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]
    c, s = absent[rng.integers(len(absent))]
    return [(f"is there a {o.color} {o.shape}", "yes"), (f"is there a {c} {s}", "no")]


def _qa(rng: np.random.Generator, objects: list[SceneObject], size: int) -> list[tuple[str, str]]:
    """3-6 unambiguous pairs: always the count, then a random draw from the other kinds."""
    shapes = Counter(o.shape for o in objects)
    colors = Counter(o.color for o in objects)
    pool = [(f"what color is the {o.shape}", o.color) for o in objects if shapes[o.shape] == 1]
    pool += [(f"what shape is the {o.color} object", o.shape) for o in objects if colors[o.color] == 1]
    pool += _relations(rng, objects, _RELATION_GAP * size / 64)
    pool += _existence(rng, objects)
    n = int(rng.integers(3, 7)) - 1
    pick = rng.permutation(len(pool))[:n]
    return [("how many objects are there", str(len(objects)))] + [pool[i] for i in pick]


def _referring(rng: np.random.Generator, objects: list[SceneObject], mask: np.ndarray) -> list:
    cells = Counter(o.position for o in objects)
    cands = []
    for i, o in enumerate(objects, start=1):
        name = f"the {o.size} {o.name()}" if rng.random() < 0.5 else f"the {o.name()}"
        cands.append((name, i))
        if cells[o.position] == 1:
            cands.append((f"the object at {o.position}", i))
    n = int(rng.integers(1, 4))
    pick = rng.permutation(len(cands))[:n]
    return [(cands[j][0], mask == cands[j][1]) for j in pick]


# ---------------------------------------------------------------------------------------------
# Public API


def _check_args(seed: int, size: int, min_objects: int, max_objects: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"scene seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise InputError(f"scene size must be an integer >= {MIN_SIZE}, got {size!r}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise InputError(
            f"expected 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}"
        )


def make_scene(seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 5) -> Scene:
    """One scene, bit-identical for a given (seed, size, min_objects, max_objects)."""
    _check_args(seed, size, min_objects, max_objects)
    rng = np.random.default_rng(int(seed))
    canvas, background = _background(rng, size)
    count = int(rng.integers(min_objects, max_objects + 1))
    painted, visible = _place(rng, size, count)
    # Caption order = raster order of centers by row band; instance ids follow it.
    order = sorted(range(len(painted)), key=lambda i: (round(painted[i].cy / (size / 4)), painted[i].cx))
    objects = [painted[i] for i in order]
    instance = np.zeros((size, size), np.int64)
    for new_id, i in enumerate(order, start=1):
        instance[visible[i]] = new_id  # visible masks are disjoint, so paint order is irrelevant here
        canvas[visible[i]] = COLORS[painted[i].color]
    noise = rng.integers(-_NOISE, _NOISE + 1, size=canvas.shape, dtype=np.int16)
    image = np.clip(canvas + noise, 0, 255).astype(np.uint8)
    return Scene(
        seed=int(seed),
        image=image,
        instance_mask=instance,
        objects=objects,
        background=background,
        caption=_caption(objects, background),
        qa=_qa(rng, objects, size),
        referring=_referring(rng, objects, instance),
    )


def scene_batch(seeds: Iterable[int], size: int = 64) -> list[Scene]:
    return [make_scene(s, size) for s in seeds]


def text_corpus(n: int = 2000, seed: int = 0, size: int = 64) -> list[str]:
    """Every caption, question, answer and expression of scenes seed..seed+n-1 (tokenizer training)."""
    out: list[str] = []
    for scene in scene_batch(range(seed, seed + n), size):
        out.append(scene.caption)
        for q, a in scene.qa:
            out += [q, a]
        out += [expr for expr, _ in scene.referring]
    return out
