"""The clustering at the patch counts real towers give (SigLIP-384: 729; 1024): the standard-op
graph is exact against the reference, holds no integer N x N tensor (the float distances are
its largest), and lints clean."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, shape_inference

from setok.backends.trt.lint import PLUGIN_OPS, lint_model, load_table
from setok.config import ClusterConfig
from setok.export.cluster import export_cluster
from setok.model.cluster import dpc_knn

CFG = ClusterConfig(k=64, tau=0.25, min_tokens=2, max_tokens=64)  # the paper's k for 729 patches


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return export_cluster(CFG, tmp_path_factory.mktemp("c") / "cluster.onnx", width=64)


@pytest.mark.parametrize("n", [729, 1024])
def test_exact_at_size(graph, n):
    import onnxruntime as ort

    x = torch.randn(2, n, 64, generator=torch.Generator().manual_seed(n))
    ref = dpc_knn(x, CFG)
    got = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"patch_features": x.numpy()})
    for a, b in zip(got, (ref.assignment, ref.num_tokens, ref.centers)):
        np.testing.assert_array_equal(a, b.numpy())


def test_no_integer_n_by_n_tensor_and_lint_clean(graph):
    n = 1024
    model = onnx.load(str(graph))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, n)):
        dim.dim_value = value
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    consumed = {i for node in inferred.graph.node for i in node.input}
    big = []
    for v in inferred.graph.value_info:
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if v.name in consumed and all(dims) and np.prod(dims) >= n * n:
            big.append((v.name, TensorProto.DataType.Name(t.elem_type), dims))
    assert big, "the walk sees the N x N tensors"
    assert {kind for _, kind, _ in big} <= {"FLOAT", "BOOL"}, [b for b in big if b[1] not in ("FLOAT", "BOOL")]
    findings = lint_model(onnx.load(str(graph)), "cluster", load_table(), set(PLUGIN_OPS))
    assert findings == [], [str(f) for f in findings]
