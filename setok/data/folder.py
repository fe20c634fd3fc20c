"""User data: a folder of images plus a JSONL captions file (images load through the runtime's loader).

Every problem a user can cause (missing files, bad JSON, corrupt images) is an InputError whose
one-line message names the exact file (and line) and what was expected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from setok.errors import InputError

log = logging.getLogger(__name__)

_LINE_FORMAT = '{"image": ..., "text": ...}'


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
