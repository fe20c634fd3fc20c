"""Images in (path, PIL image or numpy array) -> the encoder's float32 NCHW input. No torch.

Every problem a user can cause with an image file (missing, empty, corrupt, too large) is an
InputError whose one-line message names the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from setok.errors import InputError
from setok.runtime.frame import MODES, FrameMap

MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding
# Modes whose values are not 8-bit: PIL's convert("RGB") would clip them to white.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class Prepared:
    """One frame made ready for the encoder, and how it maps back."""

    rgb: np.ndarray  # (size, size, 3) uint8: the encoder's input
    frame: FrameMap  # where that square lies in the frame
    pixels: np.ndarray  # (H, W, 3) uint8: the frame itself (EXIF-rotated, RGB)


def to_rgb_array(image: Any, size: int) -> np.ndarray:
    """Any supported image -> (size, size, 3) uint8: EXIF-rotated, RGB, shorter side resized, center-cropped."""
    return prepare(image, size).rgb


def prepare(image: Any, size: int, mode: str = "crop", fill: tuple[int, int, int] = (0, 0, 0)) -> Prepared:
    """Any supported image -> the encoder's square input, its `FrameMap` and the frame's pixels.
    `mode` "crop" (shorter side resized, centre crop) or "letterbox" (longer side resized, padded
    with `fill`)."""
    from PIL import Image

    if mode not in MODES:
        raise InputError(f"preprocessing mode {mode!r}; expected one of {list(MODES)}")
    if isinstance(image, (str, Path)):
        return load_frame(image, size, mode, fill)
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3) and image.shape[:2] == (size, size) and image.dtype == np.uint8:
            # Already the encoder's size: resize and crop are the identity, so skip PIL entirely
            # (a camera loop feeding (size, size, 3) frames pays no conversion).
            rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
            if rgb.shape[-1] == 3:
                rgb = np.ascontiguousarray(rgb)
                return Prepared(rgb, FrameMap.identity(size), rgb)
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image: got {type(image).__name__}; expected a path, a PIL image or a numpy array")
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"image: {image.width}x{image.height} is over {MAX_PIXELS} pixels; refusing it")
    return fit_frame(image, size, mode, fill)


def _array_to_pil(arr: np.ndarray):
    from PIL import Image

    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"image array: shape {list(arr.shape)}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"image array: shape {list(arr.shape)} is empty")
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError("image array: contains NaN or Inf; expected finite values in [0, 1]")
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(f"image array: float values in [{arr.min():.3g}, {arr.max():.3g}]; expected [0, 1]")
        return Image.fromarray((arr[..., :3] * 255).round().astype(np.uint8))
    raise InputError(f"image array: dtype {arr.dtype}; expected uint8 or float in [0, 1]")


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32."""
    x = rgb.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # (B, H, W, 3) -> (B, 3, H, W)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def _wide_to_rgb(im):
    """16/32-bit or float grayscale -> 8-bit RGB, scaling instead of clipping."""
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = arr / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _to_rgb(im):
    from PIL import Image

    if im.mode in _WIDE_MODES:
        return _wide_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour; composite on white like a viewer would.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_crop(im, size: int):
    """Shorter side to `size` (bicubic), then the centered size x size crop."""
    from PIL import Image

    fm = FrameMap.crop(im.width, im.height, size)
    nw, nh = fm.resized
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = fm.offset
    return im.crop((left, top, left + size, top + size))


def _letterbox(im, size: int, fill: tuple[int, int, int]):
    """Longer side to `size` (bicubic), centred on a size x size square of `fill`."""
    from PIL import Image

    fm = FrameMap.letterbox(im.width, im.height, size)
    square = Image.new("RGB", (size, size), tuple(int(v) for v in fill))
    square.paste(im.resize(fm.resized, Image.Resampling.BICUBIC), (-fm.offset[0], -fm.offset[1]))
    return square


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3) from any image file PIL reads."""
    return load_frame(path, size).rgb


def load_frame(path: str | Path, size: int, mode: str = "crop", fill: tuple[int, int, int] = (0, 0, 0)) -> Prepared:
    """`prepare` for an image file: every problem with the file is an InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"image size must be a positive integer, got {size!r}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file does not exist")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    try:
        with Image.open(p) as im:
            w, h = im.size  # header only: Image.open is lazy, so this check precedes decoding
            if w * h > MAX_PIXELS:
                raise InputError(f"{p}: image is {w}x{h} = {w * h} pixels; at most {MAX_PIXELS} are allowed")
            return fit_frame(im, size, mode, fill)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"{p}: not a readable image ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        # PIL reports truncated / corrupt data and unsupported conversions with these.
        raise InputError(f"{p}: corrupt or unsupported image ({e})") from None


def fit_image(im, size: int) -> np.ndarray:
    """An opened PIL image -> (size, size, 3) uint8: EXIF orientation, RGB, resize, center crop."""
    from PIL import ImageOps

    return np.asarray(_resize_crop(_to_rgb(ImageOps.exif_transpose(im)), size), dtype=np.uint8)


def fit_frame(im, size: int, mode: str = "crop", fill: tuple[int, int, int] = (0, 0, 0)) -> Prepared:
    """An opened PIL image -> `Prepared`: EXIF orientation, RGB, then the crop or the letterbox."""
    from PIL import ImageOps

    rgb_im = _to_rgb(ImageOps.exif_transpose(im))
    square = _resize_crop(rgb_im, size) if mode == "crop" else _letterbox(rgb_im, size, fill)
    return Prepared(np.asarray(square, dtype=np.uint8), FrameMap.of(mode, rgb_im.width, rgb_im.height, size),
                    np.asarray(rgb_im, dtype=np.uint8))


def to_unit_rgb(chw: np.ndarray, pre: dict) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) RGB in [0, 1] (what token masks compare colours in)."""
    x = chw * np.asarray(pre["std"], np.float32)[:, None, None] + np.asarray(pre["mean"], np.float32)[:, None, None]
    return x.transpose(1, 2, 0)


def to_uint8(chw: np.ndarray, pre: dict) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) uint8."""
    return (np.clip(to_unit_rgb(chw, pre), 0, 1) * 255).round().astype(np.uint8)
