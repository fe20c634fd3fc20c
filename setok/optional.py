"""The one way setok imports an optional heavy dependency (tensorrt, cuda, triton, modelopt):
inside the function that needs it, turning ImportError into MissingDependency with what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from setok.errors import MissingDependency


def require(module: str, hint: str) -> ModuleType:
    """Import `module` or raise MissingDependency(hint): the hint says what to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(hint) from e
