"""Launch the AOT plugin's PTX the way TensorRT documents it, with the CUDA driver API (cuda-python).

TensorRT's AOT plugin launches `kernel(input tensors..., extra args..., output tensors...)`
(tensorrt/plugin/_lib.py, aot_impl). This module loads the PTX setok embeds (compile.aot_ptx:
Triton's hidden scratch parameters stripped, the default PTX ISA) into the current CUDA context and
launches it with exactly those arguments, so a GPU check proves the trimmed entry and the ISA work
on a real driver without TensorRT. Used by `setok gpu-check`; needs a GPU, torch and cuda-python.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from setok.optional import require

log = logging.getLogger(__name__)

_CUDA = "cuda-python is needed to launch PTX with the driver API: pip install 'cuda-python>=12.6'"
SMEM_DEFAULT = 48 * 1024  # bytes of dynamic shared memory a launch gets without opting in


def _driver() -> Any:
    return require(("cuda.bindings.driver", "cuda.cuda"), _CUDA)


def _ok(result: Any, what: str) -> Any:
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


def launch_aot_ptx(torch: Any, x: Any, cfg: Any) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    """Run the fused kernel's AOT PTX on `x` (B, N, C): ((assignment, num_tokens, centers) on the GPU, facts)."""
    from setok.plugins import cluster_kernels as ck
    from setok.plugins.compile import aot_ptx, compile_one, ptx_isa, signature

    drv = _driver()
    major, minor = torch.cuda.get_device_capability()
    b, n, c = x.shape
    compiled = compile_one(ck.FUSED_KERNEL, major * 10 + minor, n, cfg.max_tokens)
    n_args = sum(t != "constexpr" for t in signature(ck.kernel(ck.FUSED_KERNEL)).values())
    ptx = aot_ptx(compiled, n_args)
    xd = x.to(torch.float32).contiguous().cuda()  # makes torch's context current for the driver calls
    outs = (torch.full((b, n), -7, dtype=torch.int64, device="cuda"), torch.full((b,), -7, dtype=torch.int64, device="cuda"),
            torch.full((b, cfg.max_tokens), -7, dtype=torch.int64, device="cuda"))
    module = _ok(drv.cuModuleLoadData(ptx.encode() + b"\0"), "cuModuleLoadData of the AOT PTX")
    try:
        fn = _ok(drv.cuModuleGetFunction(module, compiled.metadata.name.encode()), "cuModuleGetFunction")
        shared = int(compiled.metadata.shared)
        if shared > SMEM_DEFAULT:
            attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _ok(drv.cuFuncSetAttribute(fn, attr, shared), "cuFuncSetAttribute(max dynamic shared)")
        scalars = (n, c, cfg.k, ck.tau_bits(cfg.tau), cfg.min_tokens, cfg.max_tokens)  # the extra args, in order
        values = (xd.data_ptr(), *scalars, *(o.data_ptr() for o in outs))
        kinds = (ctypes.c_void_p, *[ctypes.c_int32] * len(scalars), *[ctypes.c_void_p] * len(outs))
        block = compiled.metadata.num_warps * 32
        _ok(drv.cuLaunchKernel(fn, b, 1, 1, block, 1, 1, shared, 0, (values, kinds), 0), "cuLaunchKernel")
        _ok(drv.cuCtxSynchronize(), "cuCtxSynchronize after the AOT kernel")
    finally:
        _ok(drv.cuModuleUnload(module), "cuModuleUnload")
    return outs, {"ptx_version": ptx_isa(ptx), "params": n_args, "block": block, "shared_bytes": shared}
