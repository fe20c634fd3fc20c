"""`setok gpu-check` (scripts/gpu_check.sh): what a bare GPU machine can prove, in one command, < 8 min.

For a machine with torch, triton and cuda-python (no TensorRT, no internet needed):
- triton_kernels: the Triton DPC-KNN kernels (step and fused) on CUDA against the reference, exact, at
  N = 256, 729, 1024, with timings;
- aot_ptx: the fused kernel's PTX as the TensorRT AOT plugin embeds it (hidden Triton parameters
  stripped, default PTX ISA) loaded by the CUDA driver and launched with exactly the documented
  arguments (inputs, extra args, outputs), against the reference;
- reference_model: the shipped Setokim checkpoint's vision path on CUDA in fp32 and bf16 against CPU;
- trt_runner: TrtBackend's cuda-python buffers, stream and copies against real device memory, the
  bundle's llm.onnx run by ONNX Runtime standing in for the engine (pytest tests/gpu/test_runner_cuda.py);
- tensorrt_engines: where TensorRT is installed, the tiny bundle's engines built and run (pytest -m gpu).
Each check says passed / failed / skipped (with why) and its seconds; the report is JSON.
`--dry-run` lists the checks, checks the inputs (modules, files, output folder) and starts nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setok.config import SHIPPED_CHECKPOINT
from setok.errors import InputError

log = logging.getLogger(__name__)

BUDGET_S = 480  # the whole run; each check gets what is left
ROOT = Path(__file__).resolve().parents[2]  # the source checkout (tests/ live beside setok/)
SHIPPED = SHIPPED_CHECKPOINT
SIZES = (256, 729, 1024)


@dataclass(frozen=True)
class Check:
    name: str
    needs: tuple[str, ...]  # importable modules
    files: tuple[Path, ...]
    run: Callable[[float], dict[str, Any]]  # seconds left -> details (raises on failure)
    what: str


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _timed(fn: Callable[[], Any], torch: Any, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def _cases(torch: Any):
    from setok.config import ClusterConfig

    g = torch.Generator().manual_seed(0)
    for n in SIZES:
        yield n, torch.randn(2, n, 64, generator=g), ClusterConfig(k=min(64, n), tau=0.2, min_tokens=2, max_tokens=32)


def check_triton_kernels(left: float) -> dict[str, Any]:
    torch = _cuda()
    from setok.model.cluster import dpc_knn
    from setok.plugins.cluster_kernels import dpc_knn_triton

    out = {}
    for n, x, cfg in _cases(torch):
        ref = dpc_knn(x, cfg)
        row = {}
        for fused in (False, True):
            got = dpc_knn_triton(x.cuda(), cfg.k, cfg.tau, cfg.min_tokens, cfg.max_tokens, fused=fused)
            _same(got, ref, torch, f"N={n} fused={fused}")
            xc = x.cuda()
            row["fused_ms" if fused else "step_ms"] = _timed(
                lambda xc=xc, f=fused, c=cfg: dpc_knn_triton(xc, c.k, c.tau, c.min_tokens, c.max_tokens, fused=f), torch)
        out[f"N={n}"] = row | {"exact": True, "num_tokens": ref.num_tokens.tolist()}
    return out


def _same(got, ref, torch: Any, what: str) -> None:
    for name, a, b in zip(("assignment", "num_tokens", "centers"), got, (ref.assignment, ref.num_tokens, ref.centers)):
        if not torch.equal(a.cpu(), b):
            raise AssertionError(f"{what}: {name} differs from the reference")


def check_aot_ptx(left: float) -> dict[str, Any]:
    torch = _cuda()
    from setok.model.cluster import dpc_knn
    from setok.plugins.aot_launch import launch_aot_ptx

    out = {}
    for n, x, cfg in _cases(torch):
        got, facts = launch_aot_ptx(torch, x, cfg)
        _same(got, dpc_knn(x, cfg), torch, f"AOT PTX N={n}")
        out[f"N={n}"] = facts | {"exact": True}
    return out


def check_reference_model(left: float) -> dict[str, Any]:
    torch = _cuda()
    from setok.model.setokim import Setokim

    model = Setokim.from_pretrained(SHIPPED).eval()
    size = model.cfg.encoder.image_size
    px = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model.vision(px)
        gpu = model.cuda().vision(px.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.vision(px.cuda())
    out = {}
    for name, vt, floor in (("fp32", gpu, 0.9999), ("bf16", bf16, 0.99)):
        cos = torch.nn.functional.cosine_similarity(vt.features.float().cpu().flatten(1), cpu.features.flatten(1)).min()
        same = (vt.clusters.assignment.cpu() == cpu.clusters.assignment).float().mean()
        out[name] = {"features_cosine_min": float(cos), "assignment_agreement": float(same),
                     "num_tokens": vt.clusters.num_tokens.cpu().tolist()}
        if float(cos) < floor:
            raise AssertionError(f"{name} patch features: cosine {float(cos):.6f} < {floor} against CPU")
    out["cpu_num_tokens"] = cpu.clusters.num_tokens.tolist()
    return out


def _pytest(args: list[str], left: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=max(30, int(left)), check=False)
    tail = run.stdout.strip().splitlines()[-12:]
    if run.returncode not in (0, 5):
        raise AssertionError("pytest failed: " + " | ".join(tail))
    return {"pytest": tail}


def check_trt_runner(left: float) -> dict[str, Any]:
    return _pytest(["tests/gpu/test_runner_cuda.py"], left)


def check_train_cuda(left: float) -> dict[str, Any]:
    return _pytest(["tests/gpu/test_train_cuda.py"], left)


def check_tensorrt_engines(left: float) -> dict[str, Any]:
    return _pytest(["-m", "gpu", "tests/gpu/test_tensorrt.py"], left)


CHECKS = (
    Check("triton_kernels", ("torch", "triton"), (), check_triton_kernels,
          f"Triton kernels on CUDA == reference at N = {', '.join(map(str, SIZES))}, with timings"),
    Check("aot_ptx", ("torch", "triton", "cuda"), (), check_aot_ptx,
          "the AOT plugin's PTX launched by the CUDA driver with TensorRT's documented arguments == reference"),
    Check("reference_model", ("torch",), (SHIPPED / "model.safetensors",), check_reference_model,
          "Setokim (shipped checkpoint) vision path on CUDA fp32 / bf16 against CPU"),
    Check("trt_runner", ("torch", "cuda", "onnxruntime", "pytest"), (ROOT / "tests/gpu/test_runner_cuda.py",),
          check_trt_runner, "TrtBackend buffers / stream / copies on device memory, llm.onnx as the engine"),
    Check("train_cuda", ("torch", "pytest"), (ROOT / "tests/gpu/test_train_cuda.py",), check_train_cuda,
          "setok train --device cuda (fp32 and bf16 autocast) follows the CPU run; the checkpoint loads on the CPU"),
    Check("tensorrt_engines", ("tensorrt", "cuda", "pytest"), (ROOT / "tests/gpu/test_tensorrt.py",),
          check_tensorrt_engines, "the tiny bundle's TensorRT engines built and run (only where TensorRT is installed)"),
)


def missing(check: Check) -> list[str]:
    """Modules or files a check needs that are absent here (no import, no CUDA init)."""
    gone = [m for m in check.needs if importlib.util.find_spec(m) is None]
    return gone + [str(f) for f in check.files if not f.is_file()]


def plan(out: Path) -> dict[str, Any]:
    """The dry run: what would run, what is missing; InputError when the report cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    parent = out if out.exists() else out.parent
    if not os.access(parent if str(parent) else ".", os.W_OK):
        raise InputError(f"--out {out}: cannot write there")
    if os.environ.get("TRITON_INTERPRET"):
        raise InputError("TRITON_INTERPRET is set: the GPU check needs compiled Triton kernels; unset it")
    from setok.cli.doctor import _gpu

    return {"dry_run": True, "budget_s": BUDGET_S, "gpu": _gpu() or "no nvidia-smi: no GPU seen", "checks": {
        c.name: {"what": c.what, "would": "skip" if missing(c) else "run", "missing": missing(c)} for c in CHECKS}}


def run_checks(out: Path, only: list[str] | None = None) -> dict[str, Any]:
    """Run every check (or `only`) within BUDGET_S; write out/gpu_check.json; return the report."""
    unknown = sorted(set(only or []) - {c.name for c in CHECKS})
    if unknown:
        raise InputError(f"--only {unknown}: unknown checks; known: {[c.name for c in CHECKS]}")
    report = plan(out) | {"dry_run": False, "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    start = time.monotonic()
    for c in CHECKS:
        if only and c.name not in only:
            continue
        report["checks"][c.name] = _one(c, BUDGET_S - (time.monotonic() - start))
    report["seconds"] = round(time.monotonic() - start, 1)
    report["passed"] = all(r["status"] != "failed" for r in report["checks"].values())
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _one(check: Check, left: float) -> dict[str, Any]:
    base = {"what": check.what}
    if missing(check):
        return base | {"status": "skipped", "why": f"missing {missing(check)}"}
    if left < 10:
        return base | {"status": "skipped", "why": f"the {BUDGET_S} s budget is spent"}
    start = time.monotonic()
    try:
        details = check.run(left)
        status = {"status": "passed", "details": details}
    except Exception as e:
        log.exception("gpu check %s failed", check.name)
        status = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return base | status | {"seconds": round(time.monotonic() - start, 1)}
