"""Every module imports without the optional heavy dependencies (tensorrt, triton, cuda)."""

import importlib
import pkgutil
import subprocess
import sys

import setok


# The kernel modules are where Triton code lives: they import triton when it is installed (and
# still import without it); nothing else may pull it in.
KERNEL_MODULES = {"setok.plugins.cluster_kernels", "setok.plugins.compile"}


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(setok.__path__, "setok.")]
    assert "setok.runtime.pipeline" in names and "setok.model.cluster" in names
    for name in sorted(set(names) - KERNEL_MODULES):
        importlib.import_module(name)
    for heavy in ("tensorrt", "triton", "cuda", "modelopt"):
        assert heavy not in sys.modules, f"{heavy} imported eagerly"
    for name in sorted(KERNEL_MODULES):
        importlib.import_module(name)
    assert "tensorrt" not in sys.modules


def test_package_import_is_light():
    code = "import sys, setok, setok.cli, setok.manifest, setok.config; print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
