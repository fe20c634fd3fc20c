"""`setok lint` knows which quantized form each target takes: hand-made weight-only graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from setok.backends.trt.lint import PLUGIN_OPS, lint_model, lint_ort_cpu, load_table

K, N, BLOCK = 64, 16, 32


@pytest.fixture(scope="module")
def table() -> dict:
    return load_table()


def _io():
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])])


def _model(nodes, inits, opset=21, extra=()):
    ins, outs = _io()
    graph = helper.make_graph(nodes, "g", ins, outs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra)],
                             ir_version=10)


def _int4_dq(block: int = BLOCK, scale_const: bool = True):
    w = helper.make_tensor("w", TensorProto.INT4, [K, N], bytes(K * N // 2), raw=True)
    s = numpy_helper.from_array(np.ones((K // block, N), np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    return _model(nodes, [w, s] if scale_const else [w])


def _errors(model, table):
    return [f for f in lint_model(model, "llm", table, set(PLUGIN_OPS)) if f.severity == "error"]


def test_tensorrt_takes_blocked_int4_dequantize_matmul(table):
    assert _errors(_int4_dq(), table) == []


def test_tensorrt_rejects_matmulnbits_with_the_fix(table):
    b = numpy_helper.from_array(np.zeros((N, K // BLOCK, BLOCK // 2), np.uint8), "b")
    s = numpy_helper.from_array(np.ones(N * K // BLOCK, np.float32), "s")
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=BLOCK)
    errors = _errors(_model([node], [b, s], extra=("com.microsoft",)), table)
    assert len(errors) == 1 and "--target tensorrt" in errors[0].message and "MatMulNBits" in errors[0].message
    assert lint_ort_cpu(_model([node], [b, s], extra=("com.microsoft",)), "llm") == []  # ORT CPU runs it


def test_tensorrt_rejects_dynamic_int8_with_the_fix(table):
    w = numpy_helper.from_array(np.zeros((K, N), np.int8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["yi"]),
             helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)]
    errors = _errors(_model(nodes, [w]), table)
    assert {f.op for f in errors} >= {"DynamicQuantizeLinear", "MatMulInteger"}
    assert all("--quantizer dynamic" in f.message for f in errors if f.op in ("DynamicQuantizeLinear", "MatMulInteger"))


def test_tensorrt_block_quantization_is_int4_only(table):
    w = numpy_helper.from_array(np.zeros((K, N), np.int8), "w")
    s = numpy_helper.from_array(np.ones((K // BLOCK, N), np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    errors = _errors(_model(nodes, [w, s]), table)
    assert any("INT4 only" in f.message for f in errors), errors


def test_tensorrt_needs_constant_scales_and_int4_weights(table):
    model = _int4_dq(scale_const=False)
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [K // BLOCK, N]))
    errors = _errors(model, table)
    assert any("build-time constant" in f.message for f in errors), errors
    w = helper.make_tensor_value_info("w", TensorProto.INT4, [K, N])
    model = _int4_dq()
    model.graph.input.append(w)
    del model.graph.initializer[0]  # the int4 weights fed at run time
    assert any("INT4 only as" in f.message for f in _errors(model, table))


def test_ort_cpu_notes_the_tensorrt_form_and_flags_missing_kernels():
    notes = lint_ort_cpu(_int4_dq(), "llm")
    assert [f.severity for f in notes] == ["warning"] and "fuses them into MatMulNBits" in notes[0].message
    bad = _model([helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.microsoft")], [], extra=("com.microsoft",))
    assert [f.severity for f in lint_ort_cpu(bad, "llm")] == ["error"]
    assert any(f.message.startswith("quantized for tensorrt") for f in lint_ort_cpu(_int4_dq(), "llm", "tensorrt"))


def test_table_lists_the_forms_per_target(table):
    forms = table["quantized_forms"]
    assert {"tensorrt", "onnxruntime-cpu", "onnxruntime_only"} <= set(forms)
    assert "com.microsoft::MatMulNBits" in forms["onnxruntime_only"]
    assert onnx.defs.has("DequantizeLinear")
