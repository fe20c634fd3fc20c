"""`setok lint`: the TensorRT op table as data, the real bundle, and hand-made graphs it must reject."""

from __future__ import annotations

import json
from importlib import resources

import onnx
import pytest
from onnx import TensorProto, helper

from setok.backends.trt.lint import (
    PLUGIN_OPS,
    Finding,
    lint_bundle,
    lint_model,
    load_table,
)


@pytest.fixture(scope="module")
def table() -> dict:
    return load_table()


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _lint(model: onnx.ModelProto, table: dict) -> list[Finding]:
    return lint_model(model, "t", table, set(PLUGIN_OPS))


def _errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def _fvec(name: str, shape=("batch", "n")):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _ivec(name: str, shape=("batch", "n")):
    return helper.make_tensor_value_info(name, TensorProto.INT64, list(shape))


# ---- the table --------------------------------------------------------------------------------
def test_table_parses_with_source_and_version():
    raw = json.loads(resources.files("setok.backends.trt").joinpath("trt_onnx_ops.json").read_text())
    assert raw["source"] == "onnx/onnx-tensorrt docs/operators.md"
    assert raw["tensorrt_version"].startswith("10.")
    assert len(raw["ops"]) > 100
    lo, hi = raw["opset_range"]
    assert 1 <= lo < hi
    for op, entry in raw["ops"].items():
        assert set(entry) == {"supported", "types", "restrictions"}, op
        assert isinstance(entry["supported"], bool) and isinstance(entry["types"], list), op
    assert raw["ops"]["Unique"]["supported"] is False and raw["ops"]["TopK"]["supported"] is True


# ---- the real bundle ----------------------------------------------------------------------------
def test_tiny_bundle_has_no_errors(tiny_bundle):
    findings = lint_bundle(tiny_bundle, "tensorrt")
    assert _errors(findings) == [], "\n".join(map(str, _errors(findings)))
    assert {f.stage for f in findings} <= {"*", "encoder", "cluster", "cluster_plugin", "merger", "projector",
                                           "llm", "regress_head", "seg_head", "detokenizer"}


def test_unknown_target_is_refused(tiny_bundle):
    from setok.errors import InputError

    with pytest.raises(InputError):
        lint_bundle(tiny_bundle, "openvino")


# ---- hand-made bad graphs ---------------------------------------------------------------------------
def test_clean_graph_is_clean(table):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_fvec("x")], [_fvec("y")])
    assert _lint(m, table) == []


def test_unsupported_op(table):
    m = _model([helper.make_node("Unique", ["x"], ["y"])], [_fvec("x", ["n"])], [_fvec("y", ["m"])])
    assert any(f.op == "Unique" and "not supported" in f.message for f in _errors(_lint(m, table)))


def test_string_op_unsupported(table):
    m = _model([helper.make_node("StringNormalizer", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
               [helper.make_tensor_value_info("y", TensorProto.STRING, ["n"])])
    errs = _errors(_lint(m, table))
    assert any(f.op == "StringNormalizer" and "not supported" in f.message for f in errs)
    assert any("STRING" in f.message for f in errs) is False  # unsupported ops are not type-checked


def test_op_missing_from_table(table):
    missing = dict(table, ops={k: v for k, v in table["ops"].items() if k != "Relu"})
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_fvec("x")], [_fvec("y")])
    assert any("not in TensorRT" in f.message for f in _errors(_lint(m, missing)))


def _plugin(**attrs) -> onnx.ModelProto:
    base = {"k": 8, "tau": 0.5, "min_tokens": 2, "max_tokens": 16, "plugin_namespace": "setok"}
    base.update(attrs)
    node = helper.make_node("DensityPeakCluster", ["x"], ["a", "n", "c"], name="cluster", domain="setok",
                            **{k: v for k, v in base.items() if v is not None})
    return _model([node], [_fvec("x", ["batch", "n", 32])],
                  [_ivec("a"), _ivec("n", ["batch"]), _ivec("c", ["batch", 16])], extra_opsets=["setok"])


def test_plugin_node_is_clean(table):
    assert _errors(_lint(_plugin(), table)) == []


def test_plugin_missing_attribute(table):
    errs = _errors(_lint(_plugin(tau=None), table))
    assert any("missing attribute 'tau'" in f.message for f in errs)


def test_plugin_min_above_max(table):
    errs = _errors(_lint(_plugin(min_tokens=20, max_tokens=16), table))
    assert any("min_tokens=20, max_tokens=16" in f.message for f in errs)


def test_plugin_wrong_attribute_type(table):
    errs = _errors(_lint(_plugin(k=8.0), table))
    assert any("'k' must be INT" in f.message for f in errs)


def test_unknown_custom_domain(table):
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    m = _model([node], [_fvec("x")], [_fvec("y")], extra_opsets=["com.example"])
    assert any("com.example::Frobnicate" in f.message for f in _errors(_lint(m, table)))


def test_topk_k_from_graph_input(table):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)
    m = _model([node], [_fvec("x"), _ivec("k", [1])], [_fvec("v", ["batch", "k_out"]), _ivec("i", ["batch", "k_out"])])
    errs = _errors(_lint(m, table))
    assert any(f.op == "TopK" and "K" in f.message and "constant" in f.message for f in errs)
    assert any("data-dependent" in f.message for f in errs)  # its outputs' width comes from a value


def test_topk_constant_k_is_fine(table):
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4])
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)
    m = _model([node], [_fvec("x")], [_fvec("v", ["batch", 4]), _ivec("i", ["batch", 4])], inits=[k])
    assert _errors(_lint(m, table)) == []


def test_nonzero_feeding_graph_output(table):
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Transpose", ["nz"], ["y"], perm=[1, 0])]
    m = _model(nodes, [_fvec("x")], [_ivec("y", ["count", 2])])
    findings = _lint(m, table)
    assert any(f.op == "NonZero" and f.severity == "warning" for f in findings)
    errs = _errors(findings)
    assert any("no data-dependent shape may cross an engine boundary" in f.message and "'y'" in f.message for f in errs)


def test_opset_out_of_range(table):
    lo, hi = table["opset_range"]
    for opset in (lo - 1, hi + 1):
        m = _model([helper.make_node("Relu", ["x"], ["y"])], [_fvec("x")], [_fvec("y")], opset=opset)
        assert any(f"opset {opset}" in f.message for f in _errors(_lint(m, table)))


def test_undeclared_output_shape(table):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_fvec("x")],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert any("'y'" in f.message and "declared" in f.message for f in _errors(_lint(m, table)))


def test_asymmetric_dequantize(table):
    q = helper.make_tensor("q", TensorProto.INT8, [4], [1, 2, 3, 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    node = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])
    m = _model([node], [], [_fvec("y", [4])], inits=[q, s, zp])
    assert any("x_zero_point" in f.message for f in _errors(_lint(m, table)))


def test_unsqueeze_axes_from_input(table):
    node = helper.make_node("Unsqueeze", ["x", "axes"], ["y"])
    m = _model([node], [_fvec("x"), _ivec("axes", [1])], [_fvec("y", ["batch", "n", 1])])
    assert any(f.op == "Unsqueeze" and "axes" in f.message for f in _errors(_lint(m, table)))


def test_weights_and_constants_in_external_data_are_never_read(tmp_path, table):
    """Exporters (optimum) put large Constant attributes in external data too: lint reads the
    graph without its data file, and must not try to open it for them."""
    import numpy as np
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # raw data: what moves to external data
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((64, 64), np.float32), "cv"))
    mm = helper.make_node("MatMul", ["x", "w"], ["y0"])
    add = helper.make_node("Add", ["y0", "c"], ["y"])
    graph = helper.make_graph([c, mm, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="g.onnx_data", size_threshold=0, convert_attribute=True)
    stored = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    assert onnx.external_data_helper.uses_external_data(stored.graph.node[0].attribute[0].t)
    (tmp_path / "g.onnx_data").unlink()  # nothing may read it
    findings = _lint(onnx.load(str(tmp_path / "g.onnx"), load_external_data=False), table)
    assert not [f for f in findings if f.severity == "error"], [str(f) for f in findings]
