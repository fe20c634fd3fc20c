"""What the runtime returns: tokens, text, masks and images, each with per-stage timings (seconds)
and, for results about an input frame, where the encoder's view lies in it (`frame`). Masks, boxes
and centroids are in the frame's pixels; the encoder-input versions stay as `masks_crop` /
`mask_crop`. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from setok.runtime.frame import (
    FrameMap,
    FrameSource,
    boxes_and_centroids,
    mask_box,
    mask_centroid,
)
from setok.runtime.masks import CropOwners, token_masks

if TYPE_CHECKING:
    import PIL.Image


@dataclass
class Tokens:
    tokens: np.ndarray  # (K, D) exactly num_tokens vision tokens
    assignment: np.ndarray  # (N,) token id per patch
    centers: np.ndarray  # (K,) center patch per token
    crop: CropOwners  # the encoder-input pixels each token owns (`masks_crop`), computed on first use
    timings: dict[str, float] = field(default_factory=dict)
    source: FrameSource | None = field(default=None, repr=False, compare=False)  # the frame, for frame results

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def masks_crop(self) -> np.ndarray:
        """(K, S, S) bool: the encoder-input pixels each token owns."""
        return self.crop.masks()

    @property
    def frame(self) -> FrameMap:
        """Where the encoder's input lies in the frame passed in (identity for a size x size array)."""
        return self.source.frame if self.source is not None else FrameMap.identity(self.crop.size)

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.frame.frame_size

    @property
    def crop_box(self) -> tuple[float, float, float, float]:
        return self.frame.crop_box

    @property
    def scale(self) -> tuple[float, float]:
        return self.frame.scale

    @property
    def owners(self) -> np.ndarray:
        """(H, W) int: the token owning each frame pixel; -1 where the encoder did not see the frame."""
        if self.source is None:
            return self.crop.owners()
        return self.source.owners()

    @property
    def masks(self) -> np.ndarray:
        """(K, H, W) bool in frame pixels: the pixels each token owns (borders follow the frame's colours)."""
        if self.source is None or self.source.frame.is_identity:
            return self.masks_crop
        return token_masks(self.owners, self.num_tokens)

    @property
    def boxes(self) -> np.ndarray:
        """(K, 4) int [x0, y0, x1, y1) per token in frame pixels (-1: the token covers no frame pixel)."""
        return boxes_and_centroids(self.owners, self.num_tokens)[0]

    @property
    def centroids(self) -> np.ndarray:
        """(K, 2) float (x, y) per token in frame pixels (NaN: the token covers no frame pixel)."""
        return boxes_and_centroids(self.owners, self.num_tokens)[1]


@dataclass
class Text:
    text: str
    token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = True  # False when a deadline or max_new_tokens cut a structured answer short
    value: Any = None  # a structured answer: the choice, the regex match, the parsed JSON (None: none yet)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    frame: FrameMap | None = None


@dataclass
class Mask:
    mask: np.ndarray  # (H, W) bool in frame pixels
    selected: np.ndarray  # (K,) bool
    timings: dict[str, float] = field(default_factory=dict)
    mask_crop: np.ndarray | None = None  # (S, S) bool in the encoder's input
    frame: FrameMap | None = None

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """[x0, y0, x1, y1) in frame pixels; None for an empty mask."""
        return mask_box(self.mask)

    @property
    def centroid(self) -> tuple[float, float] | None:
        """(x, y) in frame pixels; None for an empty mask."""
        return mask_centroid(self.mask)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.frame.frame_size if self.frame else (int(self.mask.shape[1]), int(self.mask.shape[0]))

    @property
    def crop_box(self) -> tuple[float, float, float, float] | None:
        return self.frame.crop_box if self.frame else None

    @property
    def scale(self) -> tuple[float, float] | None:
        return self.frame.scale if self.frame else None


@dataclass
class Image:
    image: np.ndarray  # (H, W, 3) uint8
    num_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


# What every vision method takes: a path, a PIL image, an (H, W[, 3|4]) array, or a Tokens result.
ImageInput = Union[str, Path, np.ndarray, "PIL.Image.Image", Tokens]
