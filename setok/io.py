"""Atomic artifact writes: build in a temporary sibling (directory or file), then rename into place.

A kill at any moment leaves either the old complete artifact or the new complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory next to `dest`; on success it replaces `dest` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets normal permissions
    try:
        yield tmp
        _normal_permissions(tmp, 0o666 & ~umask)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it: os.umask can only read by setting, and a
    moment of umask 0 lets another thread create a world-writable file."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:  # Linux >= 4.7
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return _umask_probe()


def _umask_probe() -> int:
    """The umask from the mode a new file gets (where /proc has no Umask line)."""
    probe = Path(tempfile.gettempdir()) / f".setok-umask-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o777)  # created with 0o777 & ~umask
    try:
        return 0o777 & ~os.fstat(fd).st_mode
    finally:
        os.close(fd)
        os.unlink(probe)


def _normal_permissions(root: Path, mode: int) -> None:
    """Files some writers create private (optimum's external data: 0600) get the umask's mode, so a
    bundle is as readable as any file its user writes (a server in a container may run as another user)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _replace_dir(src: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(src, dest)
        return
    # A directory cannot be atomically swapped over a non-empty one: move the old one aside
    # first (one rename), then the new one in (one rename), then delete the old.
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / "x")
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is renamed onto `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if not os.path.islink(tmp):  # mkstemp makes 0600: a rewritten graph keeps normal permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to `path` through a temp file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def save_png(path: str | Path, image: Any) -> None:
    """An (H, W[, 3]) uint8 array or a PIL image to `path` as PNG, atomically."""
    from PIL import Image

    with atomic_file(path) as tmp:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp, format="PNG")
