"""`setok doctor`: what this environment can run, and whether a given bundle runs here."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import shutil
from pathlib import Path
from typing import Any

OPTIONAL = ("torch", "transformers", "optimum", "onnx", "onnxruntime", "onnxruntime_extensions", "tokenizers",
            "tensorrt", "triton", "polygraphy", "modelopt")


def _version(module: str) -> str | None:
    """The installed version without importing the module (tensorrt/triton imports are heavy)."""
    from importlib import metadata

    names = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "modelopt": ("nvidia-modelopt",),
             "onnxruntime_extensions": ("onnxruntime-extensions",)}.get(module, (module,))
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict[str, Any]:
    import setok

    env: dict[str, Any] = {"setok": setok.__version__, "python": platform.python_version(),
                           "platform": platform.platform(), "packages": {m: _version(m) for m in OPTIONAL}}
    env["onnxruntime_providers"] = _providers()
    env["gpu"] = _gpu()
    env["tensorrt_python_plugins"] = _importable("tensorrt.plugin")
    env["tensorrt_paths"] = tensorrt_paths(_trt_version(), env["tensorrt_python_plugins"], _version("triton"))
    env["cluster_plugin_in_onnxruntime"] = _importable("onnxruntime_extensions")
    env["ptxas"] = shutil.which("ptxas")
    return env


def _trt_version() -> str | None:
    """TensorRT's version: package metadata, else the module (JetPack's apt TensorRT may have no metadata)."""
    found = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_lean")
    if found or importlib.util.find_spec("tensorrt") is None:
        return found
    try:
        return importlib.import_module("tensorrt").__version__
    except Exception:  # noqa: BLE001 -- a TensorRT that does not import is not usable here
        return None


def tensorrt_paths(trt: str | None, python_plugins: bool, triton: str | None) -> dict[str, str]:
    """Which TensorRT path this machine can take for the cluster stage, and why (pure)."""
    from setok.plugins.versions import (
        TRITON_MIN,
        TRT_PYTHON_PLUGIN_MIN,
        TRT_STANDARD_MIN,
        dotted,
        version_tuple,
    )

    if trt is None:
        no = "no: TensorRT is not installed (x86: pip install 'setok[gpu]'; JetPack 6: see README, GPUs and Jetson)"
        return {"standard_ops": no, "python_plugin": no}
    v = version_tuple(trt)[:2]
    std = (f"yes: TensorRT {trt} >= {dotted(TRT_STANDARD_MIN)}" if v >= TRT_STANDARD_MIN
           else f"no: TensorRT {trt} < {dotted(TRT_STANDARD_MIN)}")
    if v < TRT_PYTHON_PLUGIN_MIN:
        plug = f"no: TensorRT {trt} < {dotted(TRT_PYTHON_PLUGIN_MIN)} has no AOT Python plugins (build uses standard ops)"
    elif not python_plugins:
        plug = "no: tensorrt.plugin does not import (tensorrt-lean, or a broken install)"
    elif triton is None or version_tuple(triton)[:2] < TRITON_MIN:
        plug = f"no: Triton >= {dotted(TRITON_MIN)} is needed to compile the kernel (found {triton})"
    else:
        plug = f"yes: TensorRT {trt}, tensorrt.plugin, Triton {triton}"
    return {"standard_ops": std, "python_plugin": plug}


def _providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _gpu() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    import subprocess

    out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], check=False, capture_output=True, text=True)
    return out.stdout.strip() or None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 -- any failure to import means "not usable here", which is the answer
        return False
    return True


def check_bundle(bundle: Path) -> list[str]:
    """Problems that stop `bundle` from running here; empty when it runs (a real one-token caption)."""
    import numpy as np

    from setok.errors import SetokError
    from setok.runtime import Pipeline

    try:
        pipe = Pipeline.open(bundle)
        pipe.caption(np.zeros((pipe.size, pipe.size, 3), np.uint8), max_new_tokens=1)
        for form in pipe.manifest.forms("cluster"):
            if form.custom_op and _importable("onnxruntime_extensions"):  # the plugin form runs here too
                pipe.tokenize(np.zeros((pipe.size, pipe.size, 3), np.uint8), cluster_stage=form.name)
    except SetokError as e:
        return [str(e)]
    return []
