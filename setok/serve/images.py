"""Images over HTTP: data URLs in, masks (PNG or RLE) and boxes out, in the client's frame.

The runtime maps its results to the pixels of the image the client sent (setok.runtime.frame), so
masks, boxes and token centers come back in its camera frame. Pixels outside the center crop were
never seen: they are never in a mask.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np

from setok.errors import InputError
from setok.runtime.preprocess import MAX_PIXELS

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # one encoded image, after base64 decoding
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.ASCII)


class PayloadTooLarge(InputError):
    """A body or image over the server's limits: answered 413."""


def image_bytes(value: object, what: str = "image") -> bytes:
    """A data URL (data:image/png;base64,...) or bare base64 -> the encoded image bytes."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{what}: got {type(value).__name__}; expected a data URL (data:image/png;base64,...)")
    if re.match(r"(?i)(https?|ftp|file)://", value):
        raise InputError(f"{what}: remote URL {value[:60]!r} refused: the server never fetches; "
                         "send the image inline as a data URL (data:image/png;base64,...)")
    if value.startswith("data:"):
        m = DATA_URL.match(value)
        if not m:
            raise InputError(f"{what}: data URL {value[:40]!r}... is not base64; expected data:image/<type>;base64,<data>")
        value = value[m.end():]
    if len(value) * 3 // 4 > MAX_IMAGE_BYTES:  # decoded size, known before decoding
        raise PayloadTooLarge(f"{what}: about {len(value) * 3 // 4} bytes; at most {MAX_IMAGE_BYTES} per image")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None
    if not raw:
        raise InputError(f"{what}: empty image")
    return raw


def open_image(raw: bytes, what: str = "image"):
    """Encoded bytes -> an upright RGB PIL image; the pixel count is checked before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw))
        w, h = im.size  # header only: Image.open is lazy
        if w * h > MAX_PIXELS:
            raise PayloadTooLarge(f"{what}: {w}x{h} = {w * h} pixels; at most {MAX_PIXELS}")
        im = ImageOps.exif_transpose(im)
        im.load()
    except Image.DecompressionBombError:  # PIL's own limit, checked as it opens the header
        raise PayloadTooLarge(f"{what}: more pixels than PIL opens; at most {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError as e:
        raise InputError(f"{what}: not a readable image ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's truncated / corrupt data
        raise InputError(f"{what}: corrupt or unsupported image ({e})") from None
    return im


def box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] (x1, y1 exclusive) of a (H, W) bool mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of False."""
    flat = np.asarray(mask, bool).T.reshape(-1)  # (H, W) -> column-major
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"format": "rle", "size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(encoded: dict) -> np.ndarray:
    """The inverse of `rle` (for clients and tests)."""
    h, w = encoded["size"]
    values = np.arange(len(encoded["counts"])) % 2 == 1
    return np.repeat(values, encoded["counts"]).reshape(w, h).T


def png(mask: np.ndarray) -> dict:
    """A 1-bit PNG (255 = in the mask), base64."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG")
    return {"format": "png", "size": [int(mask.shape[0]), int(mask.shape[1])],
            "data": base64.b64encode(buf.getvalue()).decode("ascii")}
