"""Compile the cluster kernels to PTX (and cubin) for given GPU architectures, without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) needs no driver: the NVIDIA
backend lowers to PTX with LLVM and assembles with the ptxas bundled in the triton wheel
(triton/backends/nvidia/bin/ptxas; TRITON_PTXAS_PATH overrides it). Checked with triton 3.9.0.

The PTX `.version` line is the ISA the consuming driver must read. Triton writes the newest its
bundled ptxas knows (8.8 for sm_87 and 9.x for sm_90 with Triton 3.9) unless told otherwise, and a
JetPack 6 driver (CUDA 12.6) reads at most 8.5, so every compile names its ISA: `--ptx-version`,
default per architecture (default_ptx_version). Triton's own post-processing sets that line
(triton/backends/nvidia/compiler.py, make_ptx: the `.version` rewrite from options.ptx_version).

Every BLOCK_* is a compile-time constant, so a compiled kernel serves N <= max_patches and
max_tokens <= the compiled BLOCK_T; kernels.json records these limits next to the launch grid.
FP fusion is off: products are rounded before they are added, as in the interpreter and the
float32 reference, so a GPU run is checked against the same arithmetic.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from setok.errors import InputError, MissingDependency
from setok.plugins import cluster_kernels as ck
from setok.plugins.versions import (
    ARCH_MIN_PTX,
    JETPACK6_CUDA,
    TRITON_MIN,
    TRITON_TESTED,
    dotted,
    ptx_isa_for_cuda,
    version_tuple,
)

log = logging.getLogger(__name__)

# Pointer element types by argument name; scalars are i32 except tau.
_PTR_TYPES = {
    "x_ptr": "*fp32", "d2_ptr": "*fp32", "m_ptr": "*fp32", "score_ptr": "*fp32",
    "ic_ptr": "*i8", "out_ptr": "*i64", "assign_ptr": "*i64", "centers_ptr": "*i64", "num_ptr": "*i64",
}  # fmt: skip
_SCALAR_TYPES = {"tau": "fp32"}
GRIDS = {name: "(B, N)" for name in ck.STEP_KERNELS} | {"centers_kernel": "(B,)", ck.FUSED_KERNEL: "(B,)"}
KERNELS = (*ck.STEP_KERNELS, ck.FUSED_KERNEL)


def parse_arch(arch: str) -> int:
    """'sm_87' / 'sm87' / '87' -> 87."""
    digits = arch.lower().removeprefix("sm_").removeprefix("sm").rstrip("a")
    if not digits.isdigit():
        raise InputError(f"--arch: {arch!r} is not a GPU architecture; expected e.g. sm_87, sm_89, sm_90")
    return int(digits)


def parse_ptx_version(text: str) -> int:
    """'8.5' -> 85 (Triton's ptx_version option)."""
    m = re.fullmatch(r"(\d{1,2})\.(\d)", str(text).strip())
    if not m:
        raise InputError(f"--ptx-version: {text!r} is not a PTX ISA version; expected e.g. 8.5 (JetPack 6) or 8.7")
    return int(m[1]) * 10 + int(m[2])


def installed_cuda() -> tuple[int, int] | None:
    """major.minor of the CUDA runtime installed beside TensorRT (its wheel, or cuda-python's), if any."""
    from importlib import metadata

    for dist in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime", "cuda-python"):
        try:
            return version_tuple(metadata.version(dist))[:2]
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def default_ptx_version(cc: int) -> int:
    """sm_87 (Jetson Orin): JetPack 6's ISA. Others: the installed CUDA runtime's ISA, else JetPack 6's
    (every CUDA >= 12.6 driver reads it); never below the first ISA that can target `cc`."""
    cuda = JETPACK6_CUDA if cc == 87 else (installed_cuda() or JETPACK6_CUDA)
    return max(ptx_isa_for_cuda(*cuda), ARCH_MIN_PTX.get(cc, 0))


def require_supported_triton() -> Any:
    triton = ck.require_triton()
    if version_tuple(triton.__version__)[:2] < TRITON_MIN:
        raise MissingDependency(f"triton {triton.__version__} is too old for the cluster kernels: need >= "
                                f"{dotted(TRITON_MIN)} (ASTSource constexprs=); pip install 'triton>={dotted(TRITON_MIN)}'")
    if version_tuple(triton.__version__)[:2] > TRITON_TESTED:
        log.warning("triton %s is newer than the %s the PTX compile is checked with", triton.__version__,
                    dotted(TRITON_TESTED))
    return triton


def num_warps_for(block_n: int) -> int:
    """More warps for wide rows: a [BLOCK_N, BLOCK_C] tile is spread over the threads."""
    return 4 if block_n <= 256 else 8


def signature(fn: Any) -> dict[str, str]:
    """Triton signature of one of our kernels, from its argument names."""
    sig = {}
    for name in fn.arg_names:
        if name.startswith("BLOCK_"):
            sig[name] = "constexpr"
        else:
            sig[name] = _PTR_TYPES.get(name) or _SCALAR_TYPES.get(name, "i32")
    return sig


def constexprs(fn: Any, max_patches: int, max_tokens: int) -> dict[str, int]:
    block_n, _ = ck.block_sizes(max_patches, 32)
    values = {"BLOCK_N": block_n, "BLOCK_C": 32, "BLOCK_T": ck.block_t(max_tokens)}
    return {k: v for k, v in values.items() if k in fn.arg_names}


def compile_one(name: str, cc: int, max_patches: int, max_tokens: int, ptx_version: int | None = None) -> Any:
    """triton.compile one kernel for compute capability `cc` and PTX ISA `ptx_version` (85 = 8.5;
    default per arch); returns triton's CompiledKernel."""
    triton = require_supported_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = ck.kernel(name)
    consts = constexprs(fn, max_patches, max_tokens)
    src = ASTSource(fn=fn, signature=signature(fn), constexprs=consts)
    opts = {"num_warps": num_warps_for(consts.get("BLOCK_N", 16)), "enable_fp_fusion": False,
            "ptx_version": ptx_version or default_ptx_version(cc)}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def ptx_isa(ptx: str) -> str:
    """The `.version` a PTX text declares ('8.5')."""
    m = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    if not m:
        raise RuntimeError("PTX without a .version line")
    return m[1]


def _entry_params(ptx: str, entry: str) -> list[str]:
    """The `.param` lines of `.entry <entry>(...)`, in order."""
    start = ptx.index(f".entry {entry}(")
    end = ptx.index(")", start)
    return [ln for ln in ptx[start:end].splitlines() if ln.strip().startswith(".param")]


def aot_ptx(compiled: Any, n_args: int) -> str:
    """PTX whose entry takes exactly the kernel's own `n_args` parameters.

    Triton >= 3.3 appends hidden global/profile scratch pointers to every kernel. TensorRT documents
    the AOT kernel's arguments as input tensors, extra args, output tensors and nothing else
    (tensorrt/plugin/_lib.py, aot_impl docstring: "extra_args ... located after the tensor inputs
    and before the tensor outputs"); NVIDIA's QDP sample passes Triton's PTX unmodified, which only
    works if TensorRT pads the launch. The entry trimmed to the documented layout is right either
    way (a launch that passes more parameters than the entry declares reads only the declared
    ones), provided the kernel never reads the hidden ones, which is checked here. The GPU check
    (scripts/gpu_check.sh) launches this PTX with exactly the documented arguments.
    """
    md, ptx = compiled.metadata, compiled.asm["ptx"]
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name} needs Triton scratch memory; a TensorRT AOT plugin cannot provide it")
    params = _entry_params(ptx, md.name)
    for line in params[n_args:]:
        pname = line.strip().rstrip(",").split()[-1]
        if ptx.count(pname) != 1:  # declared once, never used
            raise RuntimeError(f"{md.name}: hidden parameter {pname} is referenced; cannot drop it")
        ptx = ptx.replace(line + "\n", "", 1)
    kept = _entry_params(ptx, md.name)
    if kept:  # the new last parameter must not end with a comma
        ptx = ptx.replace(kept[-1], kept[-1].rstrip(","), 1)
    return ptx


def _write(out: Path, name: str, arch: str, compiled: Any) -> dict[str, Any]:
    stem = f"{name}.{arch}"
    if "ptx" not in compiled.asm:
        raise RuntimeError(f"triton produced no PTX for {name} on {arch}")
    (out / f"{stem}.ptx").write_text(compiled.asm["ptx"])
    entry: dict[str, Any] = {"ptx": f"{stem}.ptx"}
    if name == ck.FUSED_KERNEL:  # the form a TensorRT AOT plugin embeds
        n_args = sum(t != "constexpr" for t in signature(ck.kernel(name)).values())
        (out / f"{stem}.aot.ptx").write_text(aot_ptx(compiled, n_args))
        entry["aot_ptx"] = f"{stem}.aot.ptx"
    cubin = compiled.asm.get("cubin")
    if cubin:
        (out / f"{stem}.cubin").write_bytes(cubin)
        entry["cubin"] = f"{stem}.cubin"
    md = compiled.metadata
    entry |= {"entry": md.name, "num_warps": md.num_warps, "shared_bytes": md.shared,
              "ptx_version": ptx_isa(compiled.asm["ptx"])}
    entry["threads_per_block"] = md.num_warps * 32
    return entry


def compile_kernels(
    archs: list[str], out: Path, max_patches: int = 1024, max_tokens: int = 64, ptx_version: str | None = None
) -> dict[str, Any]:
    """Write out/<kernel>.<arch>.ptx (+ .cubin) and out/kernels.json; return the json dict.
    `ptx_version` ('8.5'): the PTX ISA of every file; default per arch (default_ptx_version)."""
    out = Path(out)
    isa = parse_ptx_version(ptx_version) if ptx_version is not None else None
    ccs = [parse_arch(a) for a in archs]  # every argument checked before any work
    if not ccs:
        raise InputError("--arch: no architecture given; expected e.g. sm_87,sm_89")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for cc in ccs:
        tag = f"sm_{cc}"
        if isa is not None and isa < ARCH_MIN_PTX.get(cc, 0):
            raise InputError(f"--ptx-version {ptx_version}: {tag} needs PTX ISA >= {ARCH_MIN_PTX[cc] / 10:.1f}")
        for name in KERNELS:
            compiled = compile_one(name, cc, max_patches, max_tokens, isa)
            entry = {"kernel": name, "arch": tag, "grid": GRIDS[name]} | _write(out, name, tag, compiled)
            entries.append(entry)
            log.info("compiled %s for %s (%d warps, %d B shared)", name, tag, entry["num_warps"], entry["shared_bytes"])
    fn0 = ck.kernel(ck.FUSED_KERNEL)
    manifest = {
        "triton_version": ck.require_triton().__version__,
        "ptx_version": "per arch" if isa is None else f"{isa // 10}.{isa % 10}",
        "max_patches": max_patches,
        "max_tokens": max_tokens,
        "constexprs": constexprs(fn0, max_patches, max_tokens),
        "fp_fusion": False,
        "kernels": entries,
    }
    (out / "kernels.json").write_text(json.dumps(manifest, indent=2))
    return manifest
