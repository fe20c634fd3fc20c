"""Compile the cluster kernels to PTX (and cubin) for given GPU architectures, without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) needs no driver: the NVIDIA
backend lowers to PTX with LLVM and assembles with the ptxas bundled in the triton wheel
(triton/backends/nvidia/bin/ptxas; TRITON_PTXAS_PATH overrides it). Checked with triton 3.9.0.

Every BLOCK_* is a compile-time constant, so a compiled kernel serves N <= max_patches and
max_tokens <= the compiled BLOCK_T; kernels.json records these limits next to the launch grid.
FP fusion is off: products are rounded before they are added, as in the interpreter and the
float32 reference, so a GPU run is checked against the same arithmetic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from setok.errors import InputError
from setok.plugins import cluster_kernels as ck

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


def compile_one(name: str, cc: int, max_patches: int, max_tokens: int) -> Any:
    """triton.compile one kernel for compute capability `cc`; returns triton's CompiledKernel."""
    triton = ck.require_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = ck.kernel(name)
    consts = constexprs(fn, max_patches, max_tokens)
    src = ASTSource(fn=fn, signature=signature(fn), constexprs=consts)
    opts = {"num_warps": num_warps_for(consts.get("BLOCK_N", 16)), "enable_fp_fusion": False}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def _entry_params(ptx: str, entry: str) -> list[str]:
    """The `.param` lines of `.entry <entry>(...)`, in order."""
    start = ptx.index(f".entry {entry}(")
    end = ptx.index(")", start)
    return [ln for ln in ptx[start:end].splitlines() if ln.strip().startswith(".param")]


def aot_ptx(compiled: Any, n_args: int) -> str:
    """PTX whose entry takes exactly the kernel's own `n_args` parameters.

    Triton >= 3.3 appends hidden global/profile scratch pointers to every kernel. TensorRT's AOT
    plugin launches with inputs, extra args and outputs only, so the hidden ones are dropped
    here; that is sound only when the kernel never reads them, which is checked.
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
    entry |= {"entry": md.name, "num_warps": md.num_warps, "shared_bytes": md.shared}
    entry["threads_per_block"] = md.num_warps * 32
    return entry


def compile_kernels(
    archs: list[str], out: Path, max_patches: int = 1024, max_tokens: int = 64
) -> dict[str, Any]:
    """Write out/<kernel>.<arch>.ptx (+ .cubin) and out/kernels.json; return the json dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for arch in archs:
        cc = parse_arch(arch)
        tag = f"sm_{cc}"
        for name in KERNELS:
            compiled = compile_one(name, cc, max_patches, max_tokens)
            entry = {"kernel": name, "arch": tag, "grid": GRIDS[name]} | _write(out, name, tag, compiled)
            entries.append(entry)
            log.info("compiled %s for %s (%d warps, %d B shared)", name, tag, entry["num_warps"], entry["shared_bytes"])
    fn0 = ck.kernel(ck.FUSED_KERNEL)
    manifest = {
        "triton_version": ck.require_triton().__version__,
        "max_patches": max_patches,
        "max_tokens": max_tokens,
        "constexprs": constexprs(fn0, max_patches, max_tokens),
        "fp_fusion": False,
        "kernels": entries,
    }
    (out / "kernels.json").write_text(json.dumps(manifest, indent=2))
    return manifest
