"""Images in (path, PIL image or numpy array) -> the encoder's float32 NCHW input. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from setok.data.folder import MAX_PIXELS  # refuse decompression bombs before decoding
from setok.errors import InputError


def to_rgb_array(image: Any, size: int) -> np.ndarray:
    """Any supported image -> (size, size, 3) uint8: EXIF-rotated, RGB, shorter side resized, center-cropped."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        from setok.data.folder import load_image

        return load_image(image, size)
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3) and image.shape[:2] == (size, size) and image.dtype == np.uint8:
            # Already the encoder's size: resize and crop are the identity, so skip PIL entirely
            # (a camera loop feeding (size, size, 3) frames pays no conversion).
            rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
            if rgb.shape[-1] == 3:
                return np.ascontiguousarray(rgb)
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image: got {type(image).__name__}; expected a path, a PIL image or a numpy array")
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"image: {image.width}x{image.height} is over {MAX_PIXELS} pixels; refusing it")
    from setok.data.folder import fit_image

    return fit_image(image, size)


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
