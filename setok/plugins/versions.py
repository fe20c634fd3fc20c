"""The versions the TensorRT path needs, said once (pyproject.toml and README are checked against
these by tests/plugins/test_versions.py). Pure: no TensorRT, Triton or CUDA import.

Why each number (NVIDIA/TensorRT, python/packaging/bindings_wheel/tensorrt/plugin/ at the tags):
- the Python (QDP) plugin needs 10.9: `aot_impl`, `KernelLaunchParams`, `SymIntExprs` and the
  `QuickPluginCreationRequest` the ONNX parser's `aot` attribute maps to are absent at v10.8.0
  (_lib.py has no aot_impl, _export.py no IS_AOT_ENABLED) and present from v10.9.0;
- the standard-op path needs 10.3 (JetPack 6's TensorRT): name-based I/O (execute_async_v3),
  INT64 tensors and the ops of trt_onnx_ops.json;
- Triton 3.2 is the first with `ASTSource(constexprs=...)` and "constexpr" in signatures (older
  releases take `constants=`); 3.9 is the newest the PTX compile is checked with.
"""

from __future__ import annotations

import re

TRT_PYTHON_PLUGIN_MIN = (10, 9)
TRT_STANDARD_MIN = (10, 3)
TRITON_MIN = (3, 2)
TRITON_TESTED = (3, 9)
JETPACK6_TRT = "10.3"
JETPACK6_CUDA = (12, 6)  # JetPack 6.x: CUDA 12.6, whose driver JIT reads PTX ISA <= 8.5


def dotted(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def version_tuple(v: str) -> tuple[int, ...]:
    """'10.8.0.43' -> (10, 8, 0, 43); 'post1' / 'rc' suffixes are dropped."""
    nums = re.findall(r"\d+", str(v).split("+")[0])
    if not nums:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(n) for n in nums[:4])


def ptx_isa_for_cuda(major: int, minor: int) -> int:
    """The PTX ISA (as 85 for 8.5) a CUDA release introduced, from NVIDIA's PTX ISA release notes:
    12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x."""
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor - (minor >= 6)
    if major == 11:
        return 70 + minor
    raise ValueError(f"CUDA {major}.{minor}: the cluster plugin needs CUDA >= 11")


# The first PTX ISA that can target each architecture (PTX ISA notes, "Target ISA notes").
ARCH_MIN_PTX = {80: 70, 86: 71, 87: 74, 89: 78, 90: 78, 100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}
