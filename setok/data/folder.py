"""User data: a folder of images plus a JSONL captions file, and a robust image loader.

Every problem a user can cause (missing files, bad JSON, corrupt images) is an InputError whose
one-line message names the exact file (and line) and what was expected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from setok.errors import InputError

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000
_LINE_FORMAT = '{"image": ..., "text": ...}'
# Modes whose values are not 8-bit: PIL's convert("RGB") would clip them to white.
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class Sample:
    image_path: Path
    text: str


def _escapes(rel: str) -> bool:
    """A path that is absolute (POSIX or Windows style) or climbs with '..' could read anything."""
    posix, win = PurePosixPath(rel), PureWindowsPath(rel)
    return posix.is_absolute() or win.is_absolute() or bool(win.drive) or ".." in win.parts


def _parse_line(line: str, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}); expected {_LINE_FORMAT}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("text"), str):
        raise InputError(f"{where}: expected an object {_LINE_FORMAT} with string values")
    if not obj["image"] or not obj["text"].strip():
        raise InputError(f"{where}: 'image' and 'text' must be non-empty")
    return obj["image"], obj["text"]


def _read_lines(cap: Path) -> list[str]:
    try:
        return cap.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{cap}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSONL") from None
    except OSError as e:
        raise InputError(f"{cap}: cannot be read ({e.strerror})") from None


def load_folder(path: str | Path, captions: str = "captions.jsonl") -> list[Sample]:
    """Samples listed in `path/captions`, one JSON object per line; blank lines are skipped."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: folder does not exist; expected a folder with images and {captions}")
    cap = root / captions
    if not cap.is_file():
        raise InputError(f"{cap} is missing; expected {cap} with lines {_LINE_FORMAT}")
    samples = []
    for lineno, line in enumerate(_read_lines(cap), start=1):
        if not line.strip():
            continue
        where = f"{cap}:{lineno}"
        rel, text = _parse_line(line, where)
        if _escapes(rel):
            raise InputError(f"{where}: image path {rel!r} leaves the folder; expected a path inside {root}")
        image_path = root / rel
        if not image_path.is_file():
            raise InputError(f"{where}: image {image_path} does not exist")
        samples.append(Sample(image_path=image_path, text=text))
    if not samples:
        raise InputError(f"{cap} has no samples; expected lines {_LINE_FORMAT}")
    log.info("loaded %d samples from %s", len(samples), cap)
    return samples


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale -> 8-bit RGB, scaling instead of clipping."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = arr / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _to_rgb(im: Image.Image) -> Image.Image:
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


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the centered size x size crop."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3) from any image file PIL reads."""
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
            return fit_image(im, size)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"{p}: not a readable image ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        # PIL reports truncated / corrupt data and unsupported conversions with these.
        raise InputError(f"{p}: corrupt or unsupported image ({e})") from None


def fit_image(im: Image.Image, size: int) -> np.ndarray:
    """An opened PIL image -> (size, size, 3) uint8: EXIF orientation, RGB, resize, center crop."""
    return np.asarray(_resize_crop(_to_rgb(ImageOps.exif_transpose(im)), size), dtype=np.uint8)
