# ruff: noqa: UP006, UP007, UP035  (typing.Tuple / Union: the forms tensorrt.plugin documents and checks)
"""The cluster op (`setok.manifest.CLUSTER_OP`) as a TensorRT Python plugin (tensorrt.plugin, TensorRT >= 10.8).

Written against TensorRT's documented `tensorrt.plugin` API (register / impl / aot_impl,
TensorDesc.shape_expr, from_shape_expr, KernelLaunchParams, SymIntExprs, SymInt32); TensorRT
itself is not installable on the development machine, so this module is unexercised there
beyond its import and its MissingDependency path.

- Shape function: fixed-size outputs, assignment [B, N], num_tokens [B], centers [B, max_tokens],
  all int64: the data-dependent token count never becomes a tensor shape inside the engine.
- JIT impl: the step kernels of cluster_kernels.py on TensorRT's stream (Python at runtime).
- AOT impl: one kernel only. TensorRT's aot_impl returns a single (name, PTX, launch params,
  extra args) per plugin and gives no workspace, so it embeds `dpc_knn_fused_kernel` (one
  program per image, no scratch). Its argument order matches TensorRT's AOT launch: input
  tensors, integer extra args, output tensors; tau travels as its int32 bit pattern because
  AOT extra args are integers only.

The ONNX node also carries `plugin_namespace`; TensorRT's ONNX parser consumes it (with
`plugin_version`) to find the creator, so it is not a plugin attribute here.
Nothing here imports tensorrt, triton or CUDA at module import.
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects the decorated functions'
# annotations as objects (trtp.TensorDesc, typing.Tuple, ...), so they must not be strings.
import logging
from types import ModuleType
from typing import Any, Tuple, Union

from setok.manifest import CLUSTER_OP
from setok.optional import require

log = logging.getLogger(__name__)

PLUGIN_ID = CLUSTER_OP.id
MAX_PATCHES = 1024  # BLOCK_N of the AOT kernel when N is not a build-time constant
_MISSING = (
    "TensorRT >= 10.8 with Python plugins (tensorrt.plugin) is needed for the cluster plugin: "
    "pip install 'setok[gpu]'"
)
_registered = False


def _trtp() -> tuple[ModuleType, ModuleType]:
    """(tensorrt, tensorrt.plugin), or MissingDependency (tensorrt-lean has no tensorrt.plugin)."""
    return require("tensorrt", _MISSING), require("tensorrt.plugin", _MISSING)


def register_plugin() -> None:
    """Register shape function, JIT impl and AOT impl of the cluster op (once)."""
    global _registered
    if _registered:
        return
    trt, trtp = _trtp()
    _register_desc(trt, trtp)
    _register_jit(trtp)
    _register_aot(trtp)
    _registered = True
    log.info("registered TensorRT plugin %s (JIT + AOT)", PLUGIN_ID)


def _register_desc(trt: ModuleType, trtp: ModuleType) -> None:
    @trtp.register(PLUGIN_ID)
    def density_peak_cluster_desc(
        x: trtp.TensorDesc, k: int, tau: float, min_tokens: int, max_tokens: int
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, n = x.shape_expr[0], x.shape_expr[1]
        return (
            trtp.from_shape_expr((b, n), dtype=trt.int64),
            trtp.from_shape_expr((b,), dtype=trt.int64),
            trtp.from_shape_expr((b, max_tokens), dtype=trt.int64),
        )


def _register_jit(trtp: ModuleType) -> None:
    @trtp.impl(PLUGIN_ID)
    def density_peak_cluster_jit(
        x: trtp.Tensor, k: int, tau: float, min_tokens: int, max_tokens: int,
        outputs: Tuple[trtp.Tensor], stream: int,
    ) -> None:  # fmt: skip
        run_jit(x, k, tau, min_tokens, max_tokens, outputs, stream)


def run_jit(x: Any, k: int, tau: float, min_tokens: int, max_tokens: int, outputs: Any, stream: int) -> None:
    """Launch the step kernels on TensorRT's buffers and stream (the JIT impl's body)."""
    import torch

    from setok.plugins.cluster_kernels import launch_dpc_knn

    # trtp.Tensor exposes __cuda_array_interface__: torch wraps TensorRT's memory, no copy.
    xt = torch.as_tensor(x, device="cuda")
    assignment, num_tokens, centers = (torch.as_tensor(o, device="cuda") for o in outputs)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):  # triton launches on torch's stream
        launch_dpc_knn(xt, assignment, num_tokens, centers, k, tau, min_tokens, max_tokens)


def _register_aot(trtp: ModuleType) -> None:
    @trtp.aot_impl(PLUGIN_ID)
    def density_peak_cluster_aot(
        x: trtp.TensorDesc, k: int, tau: float, min_tokens: int, max_tokens: int,
        outputs: Tuple[trtp.TensorDesc],
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # fmt: skip
        return aot_kernel(trtp, x, k, tau, min_tokens, max_tokens)


def _const_or(expr: Any, default: int) -> int:
    """A shape expression's build-time value when it has one."""
    return int(expr.constant_value) if getattr(expr, "is_constant", False) else default


def _device_cc() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def aot_kernel(trtp: ModuleType, x: Any, k: int, tau: float, min_tokens: int, max_tokens: int) -> tuple:
    """(kernel name, PTX, launch params, extra args) of the fused kernel for this build's GPU.

    BLOCK_N is fixed at build time: N's constant value when the profile pins it (setok's
    profiles do), else MAX_PATCHES. A longer row at run time gets -1 in every output (the
    kernel's guard) and the runtime refuses it; it is never silently clustered in part.
    """
    from setok.plugins import cluster_kernels as ck
    from setok.plugins.compile import aot_ptx, compile_one, signature

    max_n = _const_or(x.shape_expr[1], MAX_PATCHES)
    if not getattr(x.shape_expr[1], "is_constant", False):
        log.warning("%s AOT: N is not a build-time constant; the embedded kernel holds at most %d patches",
                    PLUGIN_ID, max_n)
    compiled = compile_one(ck.FUSED_KERNEL, _device_cc(), max_n, max_tokens)
    n_args = sum(t != "constexpr" for t in signature(ck.kernel(ck.FUSED_KERNEL)).values())

    launch = trtp.KernelLaunchParams()
    launch.grid_x = x.shape_expr[0]  # one program per image
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared

    # Scalars between the input and output pointers: n, c, k, tau_bits, min_tokens, max_tokens.
    values = [x.shape_expr[1], x.shape_expr[2], k, ck.tau_bits(tau), min_tokens, max_tokens]
    extra = trtp.SymIntExprs(len(values))
    for i, v in enumerate(values):
        extra[i] = trtp.SymInt32(v)
    return compiled.metadata.name, aot_ptx(compiled, n_args), launch, extra
