"""The one way setok imports an optional heavy dependency (tensorrt, cuda, triton, modelopt,
onnxruntime_extensions): inside the function that needs it, turning ImportError into
MissingDependency with what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from setok.errors import MissingDependency

TENSORRT_HINT = ("tensorrt is needed for the TensorRT path (`setok build`, backend 'tensorrt'): pip install "
                 "'setok[gpu]' on a machine with an NVIDIA GPU (TensorRT >= 10.3 for standard-op engines, >= 10.9 for the cluster plugin; JetPack 6 ships 10.3)")


def require(module: str | tuple[str, ...], hint: str) -> ModuleType:
    """Import `module` (or the first importable of several alternatives, newest API first) or
    raise MissingDependency(hint): the hint says what to install and why."""
    names = (module,) if isinstance(module, str) else module
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            error = e
    raise MissingDependency(hint) from error


def tensorrt() -> ModuleType:
    return require("tensorrt", TENSORRT_HINT)
