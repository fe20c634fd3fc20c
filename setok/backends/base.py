"""The protocol every backend's runner follows, and the input check they share. No torch here."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from setok.errors import InputError
from setok.manifest import TensorSpec


class Backend(Protocol):
    def inputs(self) -> dict[str, TensorSpec]: ...
    def outputs(self) -> dict[str, TensorSpec]: ...
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def decoder(self, batch: int = 1): ...
    def close(self) -> None: ...


def check_feeds(stage: str, specs: dict[str, TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Names, dtypes and fixed dims first, so a wrong tensor is named instead of failing deep in a backend."""
    missing, extra = set(specs) - set(feeds), set(feeds) - set(specs)
    if missing or extra:
        raise InputError(f"stage {stage}: inputs {sorted(feeds)} do not match {sorted(specs)}")
    for name, spec in specs.items():
        arr = feeds[name]
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(f"stage {stage}: input {name} is {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)):
            raise InputError(f"stage {stage}: input {name} has shape {list(arr.shape)}, expected {spec.shape}")


class StageIO:
    """What a runner knows of its stage from the manifest: the specs `inputs()` / `outputs()`
    report and every `run` checks its feeds against."""

    def __init__(self, stage: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        self.stage = stage
        self._inputs = {t.name: t for t in inputs}
        self._outputs = {t.name: t for t in outputs}

    def inputs(self) -> dict[str, TensorSpec]:
        return self._inputs

    def outputs(self) -> dict[str, TensorSpec]:
        return self._outputs

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        check_feeds(self.stage, self._inputs, feeds)
