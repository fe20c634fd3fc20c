"""Per-stage wall time, the unit every result's `timings` and every benchmark use (seconds)."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(t: dict[str, float], key: str):
    """Add the block's wall time (seconds) to t[key]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        t[key] = t.get(key, 0.0) + time.perf_counter() - start
