# ruff: noqa: UP006, UP007, UP035  (typing.Tuple / Union: the forms tensorrt.plugin documents and checks)
"""The cluster op (`setok.manifest.CLUSTER_OP`) as a TensorRT Python plugin (tensorrt.plugin, TensorRT >= 10.9).

Written against TensorRT's own `tensorrt.plugin` package (NVIDIA/TensorRT,
python/packaging/bindings_wheel/tensorrt/plugin/, v10.9.0 .. v11.x); tests/plugins/test_trt_plugin_twin.py
runs these definitions through that package (from the tensorrt-cu12-bindings wheel) on CPU.

- Shape function: fixed-size outputs, assignment [B, N], num_tokens [B], centers [B, max_tokens],
  all int64: the data-dependent token count never becomes a tensor shape inside the engine.
- JIT impl: the step kernels of cluster_kernels.py on TensorRT's stream (Python at runtime).
- AOT impl: one kernel only. TensorRT's aot_impl returns a single (name, PTX, launch params,
  extra args) per plugin and gives no workspace, so it embeds `dpc_knn_fused_kernel` (one
  program per image, no scratch). Its argument order matches TensorRT's AOT launch: input
  tensors, integer extra args, output tensors; tau travels as its int32 bit pattern because
  AOT extra args are integers only. An AOT engine needs no Python at run time.

Which implementation a build takes: with both registered, TensorRT's creator refuses to choose
(_lib.py, _TemplatePluginCreator.create_plugin: "has both AOT and JIT implementations"). The ONNX
node says `aot=1` (onnx-tensorrt importerUtils.cpp, createPlugin: a node's `aot` attribute becomes
STRICT_AOT / STRICT_JIT and overrides the network flags), and `setok build` also sets
PREFER_AOT_PYTHON_PLUGINS. The parser reads `plugin_namespace` / `plugin_version` to find the
creator and passes to the creator only the attributes it declares (onnxOpImporters.cpp, loadFields
walks the creator's field names), so those three never reach the functions below.
Nothing here imports tensorrt, triton or CUDA at module import.
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects the decorated functions'
# annotations as objects (trtp.TensorDesc, typing.Tuple, ...), so they must not be strings.
import logging
from types import ModuleType
from typing import Any, Tuple, Union

from setok.errors import MissingDependency
from setok.manifest import CLUSTER_OP
from setok.optional import require
from setok.plugins.versions import TRT_PYTHON_PLUGIN_MIN, dotted, version_tuple

log = logging.getLogger(__name__)

PLUGIN_ID = CLUSTER_OP.id
MAX_PATCHES = 1024  # BLOCK_N of the AOT kernel when TensorRT gives no bound on N
ARCH_ENV = "SETOK_PLUGIN_ARCH"  # compile the AOT kernel for this arch (e.g. sm_80) instead of the GPU's
_MISSING = (
    f"TensorRT >= {dotted(TRT_PYTHON_PLUGIN_MIN)} with Python plugins (tensorrt.plugin) is needed for the cluster "
    "plugin: pip install 'setok[gpu]' (or build with --cluster-form standard)"
)
_registered = False


def _trtp() -> tuple[ModuleType, ModuleType]:
    """(tensorrt, tensorrt.plugin), or MissingDependency (tensorrt-lean has no tensorrt.plugin;
    TensorRT < 10.9 has no aot_impl)."""
    trt = require("tensorrt", _MISSING)
    if version_tuple(trt.__version__)[:2] < TRT_PYTHON_PLUGIN_MIN:
        raise MissingDependency(f"TensorRT {trt.__version__} found; " + _MISSING)
    return trt, require("tensorrt.plugin", _MISSING)


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
    log.info("registered TensorRT plugin %s (JIT + AOT, TensorRT %s)", PLUGIN_ID, trt.__version__)


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
    # TensorRT's validator wants exactly (inputs..., attrs..., outputs, tactic) and its AOT plugin
    # passes every registered attribute positionally, in the creator's field order, then the
    # tactic (_validate.py _validate_aot_impl; _plugin_class.py _TemplateAOTPlugin.get_launch_params).
    @trtp.aot_impl(PLUGIN_ID)
    def density_peak_cluster_aot(
        x: trtp.TensorDesc, k: int, tau: float, min_tokens: int, max_tokens: int,
        outputs: Tuple[trtp.TensorDesc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:  # fmt: skip
        return aot_kernel(trtp, x, k, tau, min_tokens, max_tokens)


def max_patches(x: Any) -> int:
    """The largest N the embedded kernel must hold.

    TensorRT hands aot_impl the profile's shape ranges (TensorDesc.shape of a DynamicPluginTensorDesc:
    dims are -1 where dynamic, Shape.max the profile's max), while a dynamic dim's ShapeExpr is
    never a build-time constant, even when the profile pins min == max. So: the profile's max,
    else N's constant, else MAX_PATCHES (logged).
    """
    if x.has_shape:
        shape = x.shape
        return int(shape.max[1] if shape.is_dynamic else shape[1])
    n = x.shape_expr[1]
    if not n.is_fake and n.is_constant:
        return int(n.constant_value())  # a method, not a property (_tensor.py ShapeExpr.constant_value)
    log.warning("%s AOT: TensorRT gave no bound on N; the embedded kernel holds at most %d patches", PLUGIN_ID,
                MAX_PATCHES)
    return MAX_PATCHES


def _device_cc() -> int:
    """The build GPU's compute capability, or $SETOK_PLUGIN_ARCH (a PTX for a lower arch JIT-compiles forward)."""
    import os

    if os.environ.get(ARCH_ENV):
        from setok.plugins.compile import parse_arch

        return parse_arch(os.environ[ARCH_ENV])
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def aot_kernel(trtp: ModuleType, x: Any, k: int, tau: float, min_tokens: int, max_tokens: int) -> tuple:
    """(kernel name, PTX, launch params, extra args) of the fused kernel for this build's GPU.

    BLOCK_N is fixed at build time from the profile's largest N (max_patches). A longer row at run
    time (impossible within the profile) would get -1 in every output (the kernel's guard) and
    the runtime refuses it; it is never silently clustered in part.
    """
    from setok.plugins import cluster_kernels as ck
    from setok.plugins.compile import aot_ptx, compile_one, signature

    max_n = max_patches(x)
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
