"""Fixtures for the HTTP server tests: the shipped small checkpoint exported once (its answers
differ between scenes, the barely trained tiny model's do not) and `setok serve` processes on
loopback."""

from contextlib import contextmanager
from pathlib import Path

import pytest

from setok.config import SHIPPED_CHECKPOINT

SMALL_CKPT = SHIPPED_CHECKPOINT
API_KEY = "test-key"


@pytest.fixture(scope="session")
def small_bundle(shipped_bundle) -> Path:
    return shipped_bundle  # one export of the shipped checkpoint per session (tests/conftest.py)


@contextmanager
def running(bundle: Path, *flags: str):
    """A started and warmed `setok serve` subprocess: yields its port; SIGTERM at the end."""
    from setok.serve.bench import free_port, start_server, stop_server, wait_ready

    port = free_port()
    proc = start_server(bundle, port, *flags)
    try:
        wait_ready(port, proc)
        yield port, proc
    finally:
        stop_server(proc)
