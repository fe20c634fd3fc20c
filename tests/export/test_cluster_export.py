"""The cluster stage exported to ONNX (standard ops and plugin node) against the torch reference."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from setok.backends.onnxrt import custom_op as cluster_op
from setok.config import ClusterConfig
from setok.errors import MissingDependency
from setok.export.cluster import (
    CLUSTER_INPUTS,
    CLUSTER_OUTPUTS,
    export_cluster,
    export_cluster_plugin,
)
from setok.model.cluster import density_peaks, dpc_knn

Outputs = list[np.ndarray]
CFG = ClusterConfig()


def _session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    so = options or ort.SessionOptions()
    so.intra_op_num_threads = 1  # shared CI cores
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> Callable[[ClusterConfig, int], ort.InferenceSession]:
    """Standard-op session per (config, width), exported once."""
    cache: dict[tuple, ort.InferenceSession] = {}
    root = tmp_path_factory.mktemp("cluster_onnx")

    def get(cfg: ClusterConfig, width: int) -> ort.InferenceSession:
        key = (cfg.k, cfg.tau, cfg.min_tokens, cfg.max_tokens, width)
        if key not in cache:
            path = export_cluster(cfg, root / f"cluster_{len(cache)}.onnx", width=width)
            cache[key] = _session(path)
        return cache[key]

    return get


def reference(x: torch.Tensor, cfg: ClusterConfig) -> Outputs:
    c = dpc_knn(x, cfg)
    return [c.assignment.numpy(), c.num_tokens.numpy(), c.centers.numpy()]


def run(session: ort.InferenceSession, x: torch.Tensor) -> Outputs:
    return session.run(list(CLUSTER_OUTPUTS), {CLUSTER_INPUTS[0]: x.numpy()})


def assert_same(got: Outputs, want: Outputs) -> None:
    for name, g, w in zip(CLUSTER_OUTPUTS, got, want):
        assert g.dtype == np.int64, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ standard-op form


def test_standard_graph_is_valid_and_dynamic(tmp_path: Path) -> None:
    model = onnx.load(str(export_cluster(CFG, tmp_path / "c.onnx", width=16)))
    onnx.checker.check_model(model, full_check=True)
    assert {op.domain for op in model.opset_import} == {""}
    assert {n.domain for n in model.graph.node} == {""}
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert dims == {"assignment": ["batch", "num_patches"], "num_tokens": ["batch"], "centers": ["batch", CFG.max_tokens]}
    inp = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert inp == ["batch", "num_patches", 16]


@pytest.mark.parametrize(
    "b,n,c",
    [(1, 8, 8), (2, 16, 8), (3, 37, 32), (2, 64, 128), (1, 100, 16), (3, 256, 64), (1, 729, 32)],
)
def test_standard_matches_reference_random(standard, b: int, n: int, c: int) -> None:
    x = torch.randn(b, n, c, generator=gen(b * 1000 + n * 10 + c))
    assert_same(run(standard(CFG, c), x), reference(x, CFG))


def _tau_between(x: torch.Tensor, cfg: ClusterConfig, count: int) -> float:
    """A tau that lets exactly `count` patches of image 0 pass."""
    _, score = density_peaks(x, cfg.k)
    s = score[0].sort(descending=True).values
    return float((s[count - 1] + s[count]) / 2)


def _adversarial() -> list[tuple[str, ClusterConfig, torch.Tensor]]:
    g = gen(7)
    ints = torch.randint(-2, 3, (3, 48, 8), generator=g).float()
    # Every patch 3 times, dyadic values: exact arithmetic. With generic floats the expansion
    # formula leaves rounding noise (not 0) between duplicates and that noise, which differs
    # between backends, decides the densities.
    dup = (torch.randint(-8, 9, (2, 20, 16), generator=g) / 4).repeat(1, 3, 1)
    mid = torch.randn(2, 64, 16, generator=g)
    return [
        ("identical", CFG, torch.ones(2, 40, 16) * 0.3),
        ("zeros", CFG, torch.zeros(2, 12, 8)),
        ("one_patch_k1", ClusterConfig(k=1, tau=0.25, min_tokens=1, max_tokens=4), torch.randn(3, 1, 8, generator=g)),
        ("n_equals_k", CFG, torch.randn(2, CFG.k, 8, generator=g)),
        ("n_below_min_tokens", ClusterConfig(k=2, tau=1e9, min_tokens=5, max_tokens=8), torch.randn(2, 3, 8, generator=g)),
        ("none_above_tau", ClusterConfig(k=8, tau=1e9, min_tokens=3, max_tokens=32), torch.randn(2, 50, 16, generator=g)),
        ("all_above_tau", ClusterConfig(k=8, tau=-1.0, min_tokens=2, max_tokens=5), torch.randn(2, 50, 16, generator=g)),
        ("small_integers", CFG, ints),
        ("small_integers_min", ClusterConfig(k=4, tau=1e9, min_tokens=6, max_tokens=10), ints),
        ("duplicates", CFG, dup),
        ("duplicates_max", ClusterConfig(k=3, tau=-1.0, min_tokens=2, max_tokens=7), dup),
        ("between_min_max", ClusterConfig(k=8, tau=_tau_between(mid, CFG, 9), min_tokens=2, max_tokens=32), mid),
    ]


@pytest.mark.parametrize("name,cfg,x", _adversarial(), ids=[a[0] for a in _adversarial()])
def test_standard_matches_reference_adversarial(standard, name: str, cfg: ClusterConfig, x: torch.Tensor) -> None:
    want = reference(x, cfg)
    assert_same(run(standard(cfg, x.shape[-1]), x), want)
    if name == "between_min_max":
        assert want[1][0] == 9  # the case really lies strictly between min_tokens and max_tokens


def test_standard_fewer_patches_than_k(standard) -> None:
    x = torch.randn(2, CFG.k - 3, 8, generator=gen(3))
    assert_same(run(standard(CFG, 8), x), reference(x, CFG))


# ------------------------------------------------------------------ plugin form


def test_plugin_graph(tmp_path: Path) -> None:
    cfg = ClusterConfig(k=5, tau=0.5, min_tokens=3, max_tokens=17)
    model = onnx.load(str(export_cluster_plugin(cfg, tmp_path / "p.onnx", plugin_namespace="ns")))
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("setok", "DensityPeakCluster")
    assert list(node.input) == ["patch_features"] and list(node.output) == list(CLUSTER_OUTPUTS)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 5, "tau": pytest.approx(0.5), "min_tokens": 3, "max_tokens": 17, "plugin_namespace": b"ns",
                     "plugin_version": b"1", "aot": 1}  # the last three: read by TensorRT's ONNX parser
    assert {(o.domain, o.version) for o in model.opset_import} >= {("setok", 1)}
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert dims == {"assignment": ["batch", "num_patches"], "num_tokens": ["batch"], "centers": ["batch", 17]}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.INT64 for v in model.graph.output)


@pytest.fixture(scope="module")
def plugin_options() -> Callable[[], ort.SessionOptions]:
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        pytest.skip("onnxruntime-extensions is not installed (pip install onnxruntime-extensions)")
    return cluster_op.plugin_session_options


@pytest.mark.parametrize("b,n,c", [(2, 16, 8), (3, 33, 16), (2, 64, 128), (3, 150, 32), (2, 256, 64)])
def test_plugin_matches_standard_and_reference(tmp_path: Path, standard, plugin_options, b: int, n: int, c: int) -> None:
    # Random features: no exact score ties between different m, where numpy's and torch's exp
    # (last bit) could disagree.
    plugin = _session(export_cluster_plugin(CFG, tmp_path / "p.onnx"), plugin_options())
    x = torch.randn(b, n, c, generator=gen(b + n + c))
    want = reference(x, CFG)
    assert_same(run(plugin, x), want)
    assert_same(run(standard(CFG, c), x), want)


@pytest.mark.parametrize("name,cfg,x", _adversarial(), ids=[a[0] for a in _adversarial()])
def test_numpy_matches_reference_adversarial(name: str, cfg: ClusterConfig, x: torch.Tensor) -> None:
    got = cluster_op.dpc_knn_numpy(x.numpy(), cfg.k, cfg.tau, cfg.min_tokens, cfg.max_tokens)
    assert_same(list(got), reference(x, cfg))


def test_numpy_fewer_patches_than_k() -> None:
    x = torch.randn(2, 3, 8, generator=gen(5))
    got = cluster_op.dpc_knn_numpy(x.numpy(), CFG.k, CFG.tau, CFG.min_tokens, CFG.max_tokens)
    assert_same(list(got), reference(x, CFG))


def test_missing_extensions_raises(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import now fails
    with pytest.raises(MissingDependency, match="pip install onnxruntime-extensions"):
        cluster_op.plugin_session_options()


def test_runtime_module_does_not_import_torch() -> None:
    code = "import sys, setok.backends.onnxrt.custom_op; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
