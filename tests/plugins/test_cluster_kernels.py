"""The Triton DPC-KNN kernels against setok.model.cluster.dpc_knn (int64 equality), the
no-GPU PTX compile, and the TensorRT plugin's MissingDependency path."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

# Must precede the first import of triton / setok.plugins.cluster_kernels: triton.jit picks the
# CPU interpreter at decoration time. It stays set for this pytest process, which is harmless
# for the other test modules (none launches Triton kernels on CPU otherwise).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from setok.config import ClusterConfig
from setok.errors import MissingDependency
from setok.model.cluster import dpc_knn

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


@pytest.fixture(scope="module")
def ck():
    mod = importlib.import_module("setok.plugins.cluster_kernels")
    if type(mod.kernel(mod.FUSED_KERNEL)).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)  # imported earlier without TRITON_INTERPRET: redefine kernels
    return mod


def check_exact(ck, x: torch.Tensor, cfg: ClusterConfig) -> None:
    ref = dpc_knn(x, cfg)
    for fused in (False, True):
        a, n, c = ck.dpc_knn_triton(x, cfg.k, cfg.tau, cfg.min_tokens, cfg.max_tokens, fused=fused)
        assert a.dtype == n.dtype == c.dtype == torch.int64
        assert torch.equal(a, ref.assignment), f"assignment differs (fused={fused})"
        assert torch.equal(n, ref.num_tokens), f"num_tokens differs (fused={fused})"
        assert torch.equal(c, ref.centers), f"centers differ (fused={fused})"


@needs_triton
@pytest.mark.parametrize(("b", "n", "c", "seed"), [(1, 8, 4, 0), (2, 33, 16, 1), (2, 64, 24, 2), (3, 17, 1, 3)])
def test_random_inputs_match_reference(ck, b, n, c, seed):
    x = torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))
    check_exact(ck, x, ClusterConfig(k=8, tau=0.25, min_tokens=2, max_tokens=8))


@needs_triton
def test_ties_from_small_integer_features(ck):
    # Integer features: every d^2 and m is exact, so equal neighbourhoods give exactly equal
    # densities and scores; the index tie-breaks are what is under test.
    x = torch.randint(0, 3, (2, 40, 3), generator=torch.Generator().manual_seed(4)).float()
    check_exact(ck, x, ClusterConfig(k=6, tau=0.1, min_tokens=2, max_tokens=12))


@needs_triton
def test_grid_of_points_all_ties(ck):
    # A regular lattice: many patches share the same neighbour multiset and the same score.
    g = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1)
    check_exact(ck, g.reshape(1, 36, 2), ClusterConfig(k=5, tau=0.3, min_tokens=3, max_tokens=10))


@needs_triton
def test_single_patch(ck):
    check_exact(ck, torch.randn(2, 1, 8), ClusterConfig(k=8, tau=0.25, min_tokens=2, max_tokens=4))


@needs_triton
def test_identical_features(ck):
    x = torch.full((2, 12, 5), 0.5)
    check_exact(ck, x, ClusterConfig(k=4, tau=0.0, min_tokens=2, max_tokens=4))
    check_exact(ck, torch.zeros(1, 9, 3), ClusterConfig(k=4, tau=-1.0, min_tokens=1, max_tokens=4))


@needs_triton
def test_nothing_above_tau_falls_back_to_min_tokens(ck):
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(5))
    check_exact(ck, x, ClusterConfig(k=4, tau=1e9, min_tokens=3, max_tokens=8))


@needs_triton
def test_more_than_max_tokens_above_tau(ck):
    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(6))
    check_exact(ck, x, ClusterConfig(k=4, tau=-1.0, min_tokens=2, max_tokens=5))


@needs_triton
@needs_triton
def test_fused_kernel_built_for_fewer_patches_marks_its_outputs_invalid(ck):
    """An AOT engine's kernel has one BLOCK_N; a longer row gets -1 outputs, never a partial clustering."""
    b, n, c, max_tokens = 2, 40, 8, 6
    x = torch.randn(b, n, c)
    assignment = torch.zeros((b, n), dtype=torch.int64)
    num_tokens = torch.zeros((b,), dtype=torch.int64)
    centers = torch.zeros((b, max_tokens), dtype=torch.int64)
    ck.dpc_knn_fused_kernel[(b,)](x, n, c, 4, ck.tau_bits(0.1), 2, max_tokens, assignment, num_tokens, centers,
                                  BLOCK_N=32, BLOCK_C=8, BLOCK_T=ck.block_t(max_tokens))
    assert num_tokens.tolist() == [-1, -1]
    assert (assignment == -1).all() and (centers == -1).all()


def test_fewer_patches_than_k_and_than_min_tokens(ck):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    check_exact(ck, x, ClusterConfig(k=8, tau=0.25, min_tokens=2, max_tokens=32))
    check_exact(ck, x[:, :3], ClusterConfig(k=8, tau=1e9, min_tokens=4, max_tokens=6))


_GPU_SCRIPT = """
import torch
from setok.config import ClusterConfig
from setok.model.cluster import dpc_knn
from setok.plugins.cluster_kernels import dpc_knn_triton
g = torch.Generator().manual_seed(0)
cases = [(torch.randn(4, 196, 64, generator=g), ClusterConfig(k=16, tau=0.2, min_tokens=2, max_tokens=32)),
         (torch.randint(0, 3, (2, 64, 3), generator=g).float(), ClusterConfig(k=6, tau=0.1, min_tokens=2, max_tokens=12))]
for x, cfg in cases:
    ref = dpc_knn(x, cfg)
    for fused in (False, True):
        out = dpc_knn_triton(x.cuda(), cfg.k, cfg.tau, cfg.min_tokens, cfg.max_tokens, fused=fused)
        for got, want in zip(out, (ref.assignment, ref.num_tokens, ref.centers)):
            assert torch.equal(got.cpu(), want), (fused, got, want)
print("ok")
"""


def _env_without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_kernels_on_cuda_match_reference():
    # A fresh process: this module's process runs Triton in interpreter mode.
    run = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=_env_without_interpreter(), check=False,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]


_COMPILE_SCRIPT = """
import sys
from pathlib import Path
from setok.plugins.compile import compile_kernels
compile_kernels(["sm_87"], Path(sys.argv[1]), max_patches=64, max_tokens=16)
"""


@needs_triton
def test_compile_ptx_for_sm87_without_gpu(tmp_path):
    # triton.compile needs no driver: LLVM emits PTX and the wheel's bundled ptxas makes cubin.
    # A fresh process because the interpreter-mode kernels of this process cannot be compiled.
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(tmp_path)], env=_env_without_interpreter(), check=False,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    manifest = json.loads((tmp_path / "kernels.json").read_text())
    names = {e["kernel"] for e in manifest["kernels"]}
    assert names == {"pairwise_sq_kernel", "knn_density_kernel", "peak_score_kernel", "select_kernel",
                     "assign_kernel", "centers_kernel", "dpc_knn_fused_kernel"}  # fmt: skip
    for e in manifest["kernels"]:
        ptx = (tmp_path / e["ptx"]).read_text()
        assert ".target sm_87" in ptx
        assert f".entry {e['kernel']}(" in ptx
        assert e["num_warps"] >= 1 and e["shared_bytes"] >= 0 and e["grid"] in ("(B, N)", "(B,)")
    fused = next(e for e in manifest["kernels"] if e["kernel"] == "dpc_knn_fused_kernel")
    aot = (tmp_path / fused["aot_ptx"]).read_text()
    entry = aot[aot.index(".entry dpc_knn_fused_kernel(") : aot.index(")", aot.index(".entry dpc_knn_fused_kernel("))]
    assert entry.count(".param") == 10  # x, 6 integer scalars, 3 outputs: TensorRT's AOT layout


def test_trt_plugin_imports_and_reports_missing_tensorrt(monkeypatch):
    trt_plugin = importlib.import_module("setok.plugins.trt_plugin")
    for name in ("tensorrt", "tensorrt.plugin"):  # None in sys.modules makes `import` fail
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    with pytest.raises(MissingDependency) as err:
        trt_plugin.register_plugin()
    assert "pip install 'setok[gpu]'" in str(err.value) and "TensorRT >= 10.9" in str(err.value)


def test_plugin_modules_import_without_tensorrt_or_cuda():
    code = textwrap.dedent("""
        import sys
        import setok.plugins, setok.plugins.trt_plugin
        assert "tensorrt" not in sys.modules and "triton" not in sys.modules, sorted(sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


_PTX_SCRIPT = """
import sys
from pathlib import Path
from setok.plugins.compile import compile_kernels
compile_kernels(sys.argv[2].split(","), Path(sys.argv[1]), max_patches=64, max_tokens=16,
                ptx_version=None if sys.argv[3] == "default" else sys.argv[3])
"""


@needs_triton
@pytest.mark.parametrize(("archs", "ptx", "want"), [("sm_87", "default", "8.5"), ("sm_87,sm_90", "8.4", "8.4")])
def test_ptx_declares_the_requested_isa(tmp_path, archs, ptx, want):
    """Every .ptx (the AOT one too) declares the ISA asked for; sm_87 defaults to JetPack 6's 8.5."""
    from setok.plugins.compile import ptx_isa

    run = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(tmp_path), archs, ptx], env=_env_without_interpreter(),
                         check=False, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    manifest = json.loads((tmp_path / "kernels.json").read_text())
    files = [e[k] for e in manifest["kernels"] for k in ("ptx", "aot_ptx") if k in e]
    assert len(files) == 8 * len(archs.split(","))
    for f in files:
        text = (tmp_path / f).read_text()
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(".version"))
        assert line.split() == [".version", want], (f, line)
        assert ptx_isa(text) == want
    assert {e["ptx_version"] for e in manifest["kernels"]} == {want}
    assert all((tmp_path / e["cubin"]).is_file() for e in manifest["kernels"])  # ptxas accepted that ISA


def test_plugin_compile_refuses_a_bad_ptx_version(tmp_path):
    from click.testing import CliRunner

    from setok.cli.main import main

    for bad, why in (("85", "not a PTX ISA version"), ("7.0", "sm_87 needs PTX ISA >= 7.4")):
        result = CliRunner().invoke(main, ["plugin", "compile", "--arch", "sm_87", "--out", str(tmp_path / "o"),
                                           "--ptx-version", bad])
        assert result.exit_code == 2 and why in result.output, result.output
