"""An open Pipeline on the shipped small checkpoint's bundle (`shipped_bundle`, tests/conftest.py)."""

import pytest


@pytest.fixture(scope="module")
def shipped(shipped_bundle):
    from setok.runtime import Pipeline

    with Pipeline.open(shipped_bundle, threads=1) as pipe:
        yield pipe
