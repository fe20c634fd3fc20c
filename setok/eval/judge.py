"""An object-level judge for images of the synthetic scenes: reads an image the way a detector
would, knowing nothing of the model or of the scene that was drawn (the GenEval idea, for our
world). Definitions of the scores built on it: docs/generation.md.

Reading an (H, W, 3) image:
1. object pixels: bright ones (max channel above `BRIGHT`; backgrounds are dark and muted,
   max channel <= ~125 with noise, every palette colour has a channel >= 172 with noise), each
   given its nearest palette colour and kept when it is within `MAX_COLOUR_DIST` of it;
2. connected components (8-connectivity) of each colour; components under `MIN_PIXELS` (scaled
   with the image area) are speckle and dropped;
3. per component, a shape: every shape of the generator's own rasteriser
   (`setok.data.scenes.shape_mask`) is fitted by a pattern search over centre and radius; the
   score is an IoU that ignores pixels of other objects (an occluder may hide part of a shape);
   the best-scoring shape wins. The fitted centre gives the 3x3 cell (the caption's "at ..."),
   the fitted radius the size class; the cells the component's pixels cover are reported too.

A scene is *judgeable* when the judge reads its true image exactly as the scene generator
describes it (`reads_exactly`); scores are only computed over judgeable scenes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from setok.data import scenes as S
from setok.eval.ceiling import Described, parse_caption

BRIGHT = 148.0  # max channel: backgrounds <= 117 + noise 8; objects >= 180 - 8 (green's max)
MAX_COLOUR_DIST = 90.0  # L2 in RGB to the nearest palette colour
MIN_PIXELS = 6  # at 64 px; the generator keeps >= 12 visible pixels per object
GOOD_FIT = 0.97  # a fit this good ends the search (true shapes fit ~1.0)
MERGE_MIN_FIT = 0.85  # two same-colour parts are one object when one shape fits their union this well
_PALETTE_NAMES = tuple(S.COLORS)
_PALETTE = np.asarray([S.COLORS[c] for c in _PALETTE_NAMES], np.float32)  # (P, 3)
_SMALL_LARGE_R = 0.5 * (S._RADIUS["small"][1] + S._RADIUS["large"][0])  # 8.5 px at 64 px
_SEARCH_STEPS = (1.0, 0.5, 0.25)  # pixels, coarse to fine (then centroids centre the estimate)


@dataclass(frozen=True)
class Detection:
    """One object as the judge reads it."""

    color: str
    shape: str
    size: str
    position: str  # the 3x3 cell of the fitted centre, as a caption names it
    cells: tuple[str, ...]  # every 3x3 cell its pixels cover
    cx: float
    cy: float
    r: float
    pixels: int
    fit: float  # occlusion-aware IoU of the winning shape

    def label(self) -> str:
        return f"{self.size} {self.color} {self.shape} at {self.position}"


# ---------------------------------------------------------------------------------------------
# Pixels and components


def to_rgb255(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 255]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32)
    return np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0


def colour_map(image: np.ndarray) -> np.ndarray:
    """(H, W) palette index per object pixel, -1 for background."""
    rgb = to_rgb255(image)
    dist = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1)  # (H, W, P)
    idx = dist.argmin(-1)
    ok = (rgb.max(-1) > BRIGHT) & (np.take_along_axis(dist, idx[..., None], -1)[..., 0] <= MAX_COLOUR_DIST)
    return np.where(ok, idx, -1)


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of an (H, W) bool mask: (H, W) int labels, 0 = off, 1.. = component."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        nb = np.min([pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        new = np.where(mask, np.minimum(lab, nb), big)
        if np.array_equal(new, lab):
            break
        lab = new
    _, dense = np.unique(np.where(mask, lab, 0), return_inverse=True)
    return dense.reshape(h, w)


# ---------------------------------------------------------------------------------------------
# Shape fitting with the generator's rasteriser


@functools.cache
def _shape_moments(shape: str) -> tuple[float, float]:
    """(area / r^2, centroid y offset / r) of a shape, measured on the rasteriser at a large radius."""
    r, size = 100.0, 256
    m = S.shape_mask(shape, size / 2, size / 2, r, size)
    ys = np.nonzero(m)[0] + 0.5
    return float(m.sum()) / r**2, float(ys.mean() - size / 2) / r


_SUPPORT = 1.3  # every shape of radius r lies within 1.3 r of its centre (the triangle's corners: 1.28 r)
_MAX_R = 20.0  # at 64 px: the search never grows a shape past this (the largest object has r = 13)


@functools.lru_cache(maxsize=20000)
def _template(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """The generator's rasteriser, memoised: the search visits a lattice of centres and radii
    (see `_quantise`), so the same sub-pixel placement recurs across components and images."""
    m = S.shape_mask(shape, cx, cy, r, side)
    m.setflags(write=False)
    return m


def _quantise(p: tuple[float, float, float]) -> tuple[float, float, float]:
    """Centres on a 1/8-pixel lattice, radii on a 1/16-pixel one (the finest search steps)."""
    f = 2 / _SEARCH_STEPS[-1]
    return round(p[0] * f) / f, round(p[1] * f) / f, round(p[2] * 2 * f) / (2 * f)


class _Canvas:
    """One component to explain: its pixels and the pixels known not to hide it, padded so a
    template of any allowed radius can be laid anywhere near the image."""

    def __init__(self, target: np.ndarray, known: np.ndarray):
        self.size = target.shape[0]
        self.pad = int(np.ceil(_SUPPORT * _MAX_R * self.size / 64)) + 8
        self.target = np.pad(target, self.pad)
        self.known = np.pad(known, self.pad)  # off the image: unknown
        self.count = int(np.count_nonzero(target))

    def template(self, shape: str, cx: float, cy: float, r: float) -> tuple[np.ndarray, int, int] | None:
        """The rasterised shape on a small square around its centre: (mask, x0, y0) in image pixels."""
        if not 1.0 < r <= _MAX_R * self.size / 64 or not (-r < cx < self.size + r and -r < cy < self.size + r):
            return None
        side = 8 * int(np.ceil((2 * np.ceil(_SUPPORT * r) + 2) / 8))  # few distinct sides: the grid cache stays warm
        x0, y0 = int(np.floor(cx)) - side // 2, int(np.floor(cy)) - side // 2
        return _template(shape, round(cx - x0, 4), round(cy - y0, 4), r, side), x0, y0

    def window(self, a: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
        return a[y0 + self.pad : y0 + self.pad + side, x0 + self.pad : x0 + self.pad + side]

    def score(self, shape: str, cx: float, cy: float, r: float) -> float:
        """IoU of the shape and the component, ignoring shape pixels that are not known (another object)."""
        placed = self.template(shape, cx, cy, r)
        if placed is None:
            return -1.0
        m, x0, y0 = placed
        t = m & self.window(self.known, x0, y0, m.shape[0])
        inter = np.count_nonzero(t & self.window(self.target, x0, y0, m.shape[0]))
        union = self.count + np.count_nonzero(t) - inter
        return inter / union if union else 0.0

    def centroid_shift(self, shape: str, cx: float, cy: float, r: float) -> tuple[float, float]:
        """Component centroid minus the (known part of the) shape's centroid."""
        m, x0, y0 = self.template(shape, cx, cy, r)
        ty, tx = np.nonzero(m & self.window(self.known, x0, y0, m.shape[0]))
        gy, gx = np.nonzero(self.target)
        if not len(tx) or not len(gx):
            return 0.0, 0.0
        return float(gx.mean() - self.pad - tx.mean() - x0), float(gy.mean() - self.pad - ty.mean() - y0)


def fit_shape(shape: str, canvas: _Canvas, starts: Sequence[tuple[float, float, float]]) -> tuple[float, float, float, float]:
    """Best (score, cx, cy, r) of one shape for a component: a pattern search over (cx, cy, r)
    from each start at the coarsest step, then refined from the best."""
    memo: dict[tuple[float, float, float], float] = {}

    def f(p: tuple[float, float, float]) -> float:
        if p not in memo:
            memo[p] = canvas.score(shape, *p)
        return memo[p]

    def search(best: tuple[float, float, float], step: float) -> tuple[float, float, float]:
        while True:
            cands = [_quantise((best[0] + dx * step, best[1] + dy * step, best[2] + dr * step / 2))
                     for dx, dy, dr in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
            top = max(cands, key=f)
            if f(top) <= f(best) + 1e-9:
                return best
            best = top

    ends = [search(_quantise(s), _SEARCH_STEPS[0]) for s in starts]
    best = max(ends, key=f)
    for step in _SEARCH_STEPS[1:]:
        best = search(best, step)
    if f(best) <= 0:
        return f(best), *best
    cx, cy, r = best
    # The masks of nearby centres are identical; centre the estimate by matching centroids.
    dx, dy = canvas.centroid_shift(shape, cx, cy, r)
    if abs(dx) <= 0.5 and abs(dy) <= 0.5:
        cx, cy = cx + dx, cy + dy
    return f(best), cx, cy, r


def _cell(cx: float, cy: float, size: int) -> str:
    col = min(max(int(cx * 3 / size), 0), 2)
    row = min(max(int(cy * 3 / size), 0), 2)
    return S.POSITIONS[row * 3 + col]


def _dilate(mask: np.ndarray) -> np.ndarray:
    pad = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def _fit_component(comp: np.ndarray, objects: np.ndarray) -> tuple[float, str, float, float, float]:
    """(score, shape, cx, cy, r) of the shape that best explains one component; pixels of other
    objects are unknown (they may hide part of it)."""
    size = comp.shape[0]
    scale = size / 64
    ys, xs = np.nonzero(comp)
    n, mx, my = len(xs), float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    others = objects & ~comp
    touching = others & _dilate(comp)
    canvas = _Canvas(comp, ~others)
    # Extra starts for an occluded component: both size classes, centre pushed under the occluder.
    shifts = [(0.0, 0.0)]
    radii: list[float] = []
    if touching.any():
        ty, tx = np.nonzero(touching)
        vx, vy = float(tx.mean()) + 0.5 - mx, float(ty.mean()) + 0.5 - my
        norm = max(np.hypot(vx, vy), 1e-6)
        shifts.append((3.0 * scale * vx / norm, 3.0 * scale * vy / norm))
        radii = [6.0 * scale, 11.5 * scale]
    def fit_all(extra: bool) -> tuple[float, str, float, float, float]:
        best = None
        for shape in S.SHAPES:
            k, off = _shape_moments(shape)
            r0 = max(float(np.sqrt(n / k)), 1.5)
            rs, sh = ([r0, *radii], shifts) if extra else ([r0], shifts[:1])
            score, cx, cy, r = fit_shape(shape, canvas, [(mx + sx, my + sy - off * r, r) for r in rs for sx, sy in sh])
            if best is None or score > best[0]:
                best = (score, shape, cx, cy, r)
        return best

    best = fit_all(extra=False)
    if best[0] < GOOD_FIT and radii:
        best = max(best, fit_all(extra=True))
    return best


def _detection(comp: np.ndarray, fit: tuple[float, str, float, float, float], color: str) -> Detection:
    size = comp.shape[0]
    score, shape, cx, cy, r = fit
    ys, xs = np.nonzero(comp)
    cells = tuple(sorted({_cell(x + 0.5, y + 0.5, size) for x, y in zip(xs, ys)}, key=S.POSITIONS.index))
    size_class = "small" if r < _SMALL_LARGE_R * size / 64 else "large"
    return Detection(color, shape, size_class, _cell(cx, cy, size), cells, float(cx), float(cy), float(r),
                     len(xs), float(score))


def _merge_split(parts: list[np.ndarray], fits: list, objects: np.ndarray) -> None:
    """Join same-colour components that one shape explains at least as well as either alone:
    an occluder cut one object in two. In place, greedily."""
    merged = True
    while merged and len(parts) > 1:
        merged = False
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                if not ((_dilate(parts[i]) & objects & ~parts[i]).any() and (_dilate(parts[j]) & objects & ~parts[j]).any()):
                    continue  # a cut runs through another object: both parts must touch one
                union = parts[i] | parts[j]
                fit = _fit_component(union, objects)
                if fit[0] >= max(MERGE_MIN_FIT, fits[i][0], fits[j][0]):
                    parts[i], fits[i] = union, fit
                    del parts[j], fits[j]
                    merged = True
                    break
            if merged:
                break


def read_image(image: np.ndarray) -> list[Detection]:
    """Every object the judge sees in an (H, W, 3) image, in raster order of the fitted centres."""
    cmap = colour_map(image)
    size = cmap.shape[0]
    min_pixels = max(2, round(MIN_PIXELS * cmap.size / 64**2))
    objects = cmap >= 0
    out = []
    for ci in np.unique(cmap[objects]):
        labels = components(cmap == ci)
        parts = [labels == k for k in range(1, int(labels.max()) + 1)]
        parts = [p for p in parts if np.count_nonzero(p) >= min_pixels]
        fits = [_fit_component(p, objects) for p in parts]
        _merge_split(parts, fits, objects)
        out += [_detection(p, f, _PALETTE_NAMES[ci]) for p, f in zip(parts, fits)]
    return sorted(out, key=lambda d: (round(d.cy / (size / 4)), d.cx))


# ---------------------------------------------------------------------------------------------
# Scoring a reading against what a caption describes


def _matching(described: Sequence[Described], detected: Sequence[Detection],
              ok: Callable[[Described, Detection], bool]) -> int:
    """Size of a maximum one-to-one matching of described objects to detections where ok(o, d)."""
    owner: dict[int, int] = {}  # detection index -> described index

    def augment(i: int, seen: set[int]) -> bool:
        for j, d in enumerate(detected):
            if j not in seen and ok(described[i], d):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(described)))


CHECKS: dict[str, Callable[[Described, Detection], bool]] = {
    "colour": lambda o, d: o.color == d.color,
    "position": lambda o, d: o.color == d.color and o.position == d.position,
    "shape": lambda o, d: o.color == d.color and o.shape == d.shape,
    "exact": lambda o, d: (o.color, o.shape, o.size, o.position) == (d.color, d.shape, d.size, d.position),
}


@dataclass(frozen=True)
class Verdict:
    """A reading scored against a caption: matched counts out of `described` objects."""

    described: int
    detected: int
    colour: int
    position: int
    shape: int
    exact: int

    @property
    def count_ok(self) -> bool:
        return self.detected == self.described

    @property
    def all_ok(self) -> bool:
        """Every described object read with its colour, shape, size and cell, and nothing extra."""
        return self.exact == self.described == self.detected


def judge(described: Sequence[Described], detected: Sequence[Detection]) -> Verdict:
    m = {k: _matching(described, detected, ok) for k, ok in CHECKS.items()}
    return Verdict(len(described), len(detected), m["colour"], m["position"], m["shape"], m["exact"])


def judge_caption(caption: str, image: np.ndarray) -> Verdict:
    """Read an image and score it against a scene-generator caption."""
    return judge(parse_caption(caption)[0], read_image(image))


def reads_exactly(caption: str, image: np.ndarray) -> bool:
    """Is this (true) image read exactly as its caption describes it? -> the scene is judgeable."""
    return judge_caption(caption, image).all_ok


# ---------------------------------------------------------------------------------------------
# The eval keys (docs/generation.md)

# recon_colour / recon_position / recon_count read reconstructions like generations: what the
# detokenizer itself allows a generator (its colour fringes between objects break recon_count).
JUDGE_KEYS = ("judgeable", "gen_colour", "gen_position", "gen_count", "gen_shape", "gen_all",
              "recon_colour", "recon_position", "recon_count", "recon_shape", "recon_all")


def judge_rows(caption: str, truth: np.ndarray, recon: np.ndarray, generated: np.ndarray) -> dict[str, list[float]]:
    """One scene's contribution to the judge keys: `judgeable` always (1 or 0); the others only
    when the judge reads the true image exactly. Object-level keys (gen_colour, gen_position,
    gen_shape, recon_colour, recon_position, recon_shape) add one 0/1 per described object; scene-level keys one per scene."""
    described = parse_caption(caption)[0]
    rows: dict[str, list[float]] = {key: [] for key in JUDGE_KEYS}
    ok = judge(described, read_image(truth)).all_ok
    rows["judgeable"].append(float(ok))
    if not ok:
        return rows
    n = len(described)

    def per_object(matched: int) -> list[float]:
        return [1.0] * matched + [0.0] * (n - matched)

    gen = judge(described, read_image(generated))
    rows["gen_colour"] += per_object(gen.colour)
    rows["gen_position"] += per_object(gen.position)
    rows["gen_shape"] += per_object(gen.shape)
    rows["gen_count"].append(float(gen.count_ok))
    rows["gen_all"].append(float(gen.all_ok))
    rec = judge(described, read_image(recon))
    rows["recon_colour"] += per_object(rec.colour)
    rows["recon_position"] += per_object(rec.position)
    rows["recon_count"].append(float(rec.count_ok))
    rows["recon_shape"] += per_object(rec.shape)
    rows["recon_all"].append(float(rec.all_ok))
    return rows
