"""Where the encoder's square input lies in the caller's frame, and results carried back to it.

The encoder sees a `size` x `size` image made from the frame by one of two rules (the manifest's
preprocessing, or `Pipeline.open(..., letterbox=True)`):

- "crop" (the default, what the model was trained on): the shorter side is resized to `size`
  (bicubic), then the centred `size` x `size` square is cut out; the frame's edges beyond the square
  are not seen.
- "letterbox": the longer side is resized to `size` and the image is centred on a square of the
  normalisation mean's colour; nothing of the frame is cut off, the objects are smaller.

`FrameMap` records the rule's numbers: `frame_size` (width, height), `scale` (encoder pixels per
frame pixel, x and y: the rounding of the resize makes them differ slightly), `offset` (where encoder
pixel (0, 0) lies in the resized frame; negative in letterbox mode) and `crop_box`, the square's
corners in frame pixels. Coordinates are continuous: frame pixel (x, y) spans [x, x+1) x [y, y+1),
as in PIL, so a box [x0, y0, x1, y1] has exclusive x1, y1 and a centroid of a one-pixel mask at
(x, y) is (x + 0.5, y + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from setok.runtime.masks import CropOwners

MODES = ("crop", "letterbox")


@dataclass(frozen=True)
class FrameMap:
    frame_size: tuple[int, int]  # (width, height) of the frame passed in (after EXIF rotation)
    size: int  # the encoder's square input
    scale: tuple[float, float]  # encoder pixels per frame pixel, (x, y)
    offset: tuple[int, int]  # encoder pixel (0, 0) in resized-frame pixels; negative: letterbox padding
    mode: str = "crop"

    @classmethod
    def identity(cls, size: int) -> FrameMap:
        return cls((size, size), size, (1.0, 1.0), (0, 0), "crop")

    @classmethod
    def crop(cls, width: int, height: int, size: int) -> FrameMap:
        """Shorter side to `size`, then the centred square (as preprocess._resize_crop does)."""
        s = size / min(width, height)
        nw, nh = max(size, round(width * s)), max(size, round(height * s))
        return cls((width, height), size, (nw / width, nh / height), ((nw - size) // 2, (nh - size) // 2), "crop")

    @classmethod
    def letterbox(cls, width: int, height: int, size: int) -> FrameMap:
        """Longer side to `size`, centred on a padded square."""
        s = size / max(width, height)
        nw, nh = max(1, min(size, round(width * s))), max(1, min(size, round(height * s)))
        return cls((width, height), size, (nw / width, nh / height), (-((size - nw) // 2), -((size - nh) // 2)),
                   "letterbox")

    @classmethod
    def of(cls, mode: str, width: int, height: int, size: int) -> FrameMap:
        if mode == "crop":
            return cls.crop(width, height, size)
        return cls.letterbox(width, height, size)

    @property
    def is_identity(self) -> bool:
        return self.frame_size == (self.size, self.size) and self.offset == (0, 0)

    @property
    def resized(self) -> tuple[int, int]:
        """The frame's size after the resize, before the crop or the padding."""
        w, h = self.frame_size
        return round(w * self.scale[0]), round(h * self.scale[1])

    @property
    def crop_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the encoder's square in frame pixels (beyond the frame in letterbox mode)."""
        x0, y0 = self.to_frame(0.0, 0.0)
        x1, y1 = self.to_frame(float(self.size), float(self.size))
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def visible_box(self) -> tuple[int, int, int, int]:
        """[x0, y0, x1, y1): the frame pixels whose centre the encoder sees."""
        cols, rows = self._index(1), self._index(0)
        xs, ys = np.flatnonzero((cols >= 0) & (cols < self.size)), np.flatnonzero((rows >= 0) & (rows < self.size))
        return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1

    def to_frame(self, x, y):
        """Encoder-input coordinates -> frame coordinates (scalars or arrays)."""
        (sx, sy), (ox, oy) = self.scale, self.offset
        return (np.asarray(x, np.float64) + ox) / sx, (np.asarray(y, np.float64) + oy) / sy

    def to_encoder(self, x, y):
        """Frame coordinates -> encoder-input coordinates."""
        (sx, sy), (ox, oy) = self.scale, self.offset
        return np.asarray(x, np.float64) * sx - ox, np.asarray(y, np.float64) * sy - oy

    def _index(self, axis: int) -> np.ndarray:
        """The encoder pixel row (axis 0) or column (axis 1) each frame pixel's centre falls in."""
        n = self.frame_size[1 - axis]
        s, o = self.scale[1 - axis], self.offset[1 - axis]
        return np.floor((np.arange(n) + 0.5) * s - o).astype(np.int64)

    def gather(self, crop: np.ndarray, outside=0) -> np.ndarray:
        """(size, size, ...) per encoder pixel -> (height, width, ...) per frame pixel (nearest)."""
        if self.is_identity:
            return crop
        rows, cols = self._index(0), self._index(1)
        out = crop[np.clip(rows, 0, self.size - 1)[:, None], np.clip(cols, 0, self.size - 1)[None]]
        inside = ((rows >= 0) & (rows < self.size))[:, None] & ((cols >= 0) & (cols < self.size))[None]
        out[~inside] = outside
        return out

    def to_dict(self) -> dict:
        """JSON-ready: what `setok run --json` and the examples print."""
        return {"frame_size": list(self.frame_size), "crop_box": [round(float(v), 3) for v in self.crop_box],
                "scale": [round(v, 6) for v in self.scale], "mode": self.mode}


@dataclass
class FrameSource:
    """What a token result needs to draw its masks in frame pixels: computed on first use (a frame
    loop that only asks questions never pays for it) and cached (shared by copies of the result)."""

    frame: FrameMap
    crop: CropOwners  # the tokens at the encoder's pixels (owners, mean colours)
    pixels: np.ndarray | None  # (H, W, 3) uint8, the frame; None: nearest neighbour only
    _owners: np.ndarray | None = field(default=None, repr=False)

    def owners(self) -> np.ndarray:
        """(H, W) int token per frame pixel; -1 where the encoder did not see the frame (crop mode)."""
        if self._owners is None:
            self._owners = frame_owners(self.crop.owners(), self.crop.means(), self.pixels, self.frame)
        return self._owners


def frame_owners(owners_crop: np.ndarray, means: np.ndarray, pixels: np.ndarray | None, fm: FrameMap) -> np.ndarray:
    """(S, S) token per encoder pixel -> (H, W) token per frame pixel, -1 outside the encoder's view.

    Nearest neighbour, then each frame pixel that maps onto a border of the encoder-level owners
    (an encoder pixel with another token in its 3x3 neighbourhood) goes to the neighbouring token
    whose mean colour is nearest its own colour in the frame: borders follow the frame's colour
    edges at the frame's resolution (as `masks.pixel_owners` does inside patches), not the
    encoder pixels' steps of 1 / scale frame pixels.
    """
    if fm.is_identity:
        return np.asarray(owners_crop, np.int64)
    s = fm.size
    rows, cols = fm._index(0), fm._index(1)
    rc, cc = np.clip(rows, 0, s - 1), np.clip(cols, 0, s - 1)
    inside = ((rows >= 0) & (rows < s))[:, None] & ((cols >= 0) & (cols < s))[None]
    out = owners_crop[rc[:, None], cc[None]].astype(np.int64)  # (H, W)
    if pixels is not None and means.shape[0] > 1:
        pad = np.pad(owners_crop, 1, mode="edge")
        shifts = [(1, 1)] + [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]  # own token first
        cands = np.stack([pad[dy:dy + s, dx:dx + s] for dy, dx in shifts])  # (9, S, S)
        border = (cands != owners_crop[None]).any(0)
        ys, xs = np.nonzero(border[rc[:, None], cc[None]] & inside)
        if len(ys):
            c = cands[:, rc[ys], cc[xs]].T  # (n, 9) candidate tokens of each border pixel
            px = pixels[ys, xs, :3].astype(np.float32) / 255.0  # (n, 3)
            m = means.astype(np.float32)
            # |p - m|^2 up to the pixel's own |p|^2, to every token at once: (n, 3) @ (3, K) -> (n, K)
            to_all = (m * m).sum(1)[None] - 2 * px @ m.T
            d = np.take_along_axis(to_all, c, 1)  # (n, 9)
            out[ys, xs] = np.take_along_axis(c, d.argmin(1)[:, None], 1)[:, 0]  # ties: the pixel's own token
    out[~inside] = -1
    return out


def boxes_and_centroids(owners: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) token per pixel (-1: none) -> (K, 4) int boxes [x0, y0, x1, y1) and (K, 2) float
    centroids (x, y); a token with no pixel gets a box of -1 and a centroid of NaN."""
    h, w = owners.shape
    flat = owners.reshape(-1)
    keep = flat >= 0
    o = flat[keep]
    ys, xs = np.divmod(np.flatnonzero(keep), w)
    counts = np.bincount(o, minlength=k)[:k]
    boxes = np.full((k, 4), -1, np.int64)
    lo_x, lo_y = np.full(k, w, np.int64), np.full(k, h, np.int64)
    hi_x, hi_y = np.full(k, -1, np.int64), np.full(k, -1, np.int64)
    np.minimum.at(lo_x, o, xs)
    np.minimum.at(lo_y, o, ys)
    np.maximum.at(hi_x, o, xs)
    np.maximum.at(hi_y, o, ys)
    seen = counts > 0
    boxes[seen] = np.stack([lo_x, lo_y, hi_x + 1, hi_y + 1], 1)[seen]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(o, xs + 0.5, minlength=k)[:k] / counts
        cy = np.bincount(o, ys + 0.5, minlength=k)[:k] / counts
    return boxes, np.stack([cx, cy], 1)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """[x0, y0, x1, y1) of a (H, W) bool mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def mask_centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)
