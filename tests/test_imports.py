"""Every module imports without the optional heavy dependencies (tensorrt, triton, cuda).

Checked in a fresh interpreter: inside pytest other tests (torch's exporter) may already have
imported triton."""

import subprocess
import sys

CHECK = r"""
import importlib, pkgutil, sys
import setok
# The kernel modules are where Triton code lives: they import triton when it is installed (and
# still import without it); nothing else may pull it in.
KERNEL_MODULES = {"setok.plugins.cluster_kernels", "setok.plugins.compile"}
names = [m.name for m in pkgutil.walk_packages(setok.__path__, "setok.")]
assert "setok.runtime.pipeline" in names and "setok.model.cluster" in names, names
for name in sorted(set(names) - KERNEL_MODULES):
    importlib.import_module(name)
eager = [h for h in ("tensorrt", "triton", "cuda", "modelopt") if h in sys.modules]
assert not eager, f"imported eagerly: {eager}"
for name in sorted(KERNEL_MODULES):
    importlib.import_module(name)
assert "tensorrt" not in sys.modules
print(len(names))
"""


def test_every_module_imports():
    proc = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) > 30


def test_package_import_is_light():
    code = "import sys, setok, setok.cli, setok.manifest, setok.config; print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
