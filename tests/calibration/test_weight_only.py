"""Weight-only int4/int8 LLM weights and `--target`: real graphs of the tiny bundle, real ORT sessions."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from setok import manifest as M
from setok.calibration import calibrate_bundle
from setok.calibration import weights as W
from setok.errors import InputError, MissingDependency


def _spec(**kw) -> W.WeightSpec:
    return W.WeightSpec(**{"format": "int4", "block_size": 32, "accuracy_level": 4, "algorithm": "rtn", **kw})


def _calibrate(bundle, out, spec, **kw):
    kw = {"n": 8, "stages": ["llm"], "speed_gate": False, "task_gate": 0, **kw}
    return calibrate_bundle(bundle, out, target=spec.target, llm_weights=spec, **kw)


@pytest.fixture(scope="module")
def ort_int4(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "b"
    return out, _calibrate(tiny_bundle, out, _spec())


@pytest.fixture(scope="module")
def trt_int4(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4t") / "b"
    return out, _calibrate(tiny_bundle, out, _spec(target="tensorrt", block_size=16, quantize_lm_head=True))


def _graph(bundle):
    m = M.load_manifest(bundle)
    return m.stage("llm"), onnx.load(str(bundle / m.stage("llm").file))


def _weights(bundle) -> dict[str, list[int]]:
    """fp32 graph: MatMul node name -> its constant weight's dims."""
    g = onnx.load(str(bundle / "llm.onnx")).graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    return {n.name: inits[n.input[1]] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}


def test_matmulnbits_placement_block_size_and_record(ort_int4, tiny_bundle):
    out, rep = ort_int4
    entry, model = _graph(out)
    weights = _weights(tiny_bundle)
    head = W.lm_head(onnx.load(str(tiny_bundle / "llm.onnx")).graph)
    nbits = {n.name.removesuffix("_Q4"): n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert set(nbits) == set(weights) - {head}, "every constant-weight MatMul but the LM head"
    for name, node in nbits.items():
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"K": weights[name][0], "N": weights[name][1], "bits": 4, "block_size": 32, "accuracy_level": 4}
        assert node.domain == "com.microsoft" and len(node.input) == 3  # symmetric: no zero points
    assert head in {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert entry.precision == "int4" and entry.file == "llm.int4.onnx"
    assert {k: entry.extra[k] for k in ("weight_format", "weight_form", "block_size", "accuracy_level", "algorithm", "lm_head", "target")} == {
        "weight_format": "int4", "weight_form": "MatMulNBits", "block_size": 32, "accuracy_level": 4, "algorithm": "rtn",
        "lm_head": "fp32", "target": "onnxruntime-cpu"}
    r = rep["stages"]["llm"]
    assert r["quantized_matmuls"] == len(nbits) and r["quantized_mb"] < r["fp32_mb"]
    # Measured on the tiny bundle: worst output cosine 0.995 (the KV cache), logits 0.9998, argmax 100 %.
    assert r["cosine"] >= 0.99 and r["logits_cosine"] >= 0.999 and r["next_token_agreement"] >= 0.95, r
    assert not list(out.glob("llm.onnx"))  # the fp32 graph is not carried along


def test_int4_bundle_runs_like_fp32(ort_int4, tiny_bundle):
    from setok.data.items import eval_items
    from setok.runtime.pipeline import Pipeline

    img = eval_items(1, seed=3)[0].image
    a, b = Pipeline.open(ort_int4[0], threads=1), Pipeline.open(tiny_bundle, threads=1)
    assert a.tokenize(img).num_tokens == b.tokenize(img).num_tokens  # vision stages untouched
    assert isinstance(a.caption(img, max_new_tokens=4).text, str)


def test_tensorrt_form_is_blocked_int4_dequantize_matmul(trt_int4, tiny_bundle):
    from setok.backends.trt.build import other_target
    from setok.backends.trt.lint import lint_bundle

    out, rep = trt_int4
    entry, model = _graph(out)
    weights = _weights(tiny_bundle)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(weights) and not any(n.op_type == "MatMulNBits" for n in g.node)  # the LM head too
    readers = {i: n for n in g.node for i in n.input}
    for n in dq:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w, s = inits[n.input[0]], inits[n.input[1]]
        assert attrs == {"axis": 0, "block_size": 16} and len(n.input) == 2  # no zero point
        assert w.data_type == TensorProto.INT4 and list(s.dims) == [-(-w.dims[0] // 16), w.dims[1]]
        mm = readers[n.output[0]]
        assert mm.op_type == "MatMul" and mm.input[1] == n.output[0]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21 == entry.opset
    assert entry.extra["weight_form"] == "DequantizeLinear+MatMul" and entry.extra["lm_head"] == "int4"
    assert entry.extra["accuracy_level"] is None and entry.extra["target"] == "tensorrt"
    assert rep["target"] == "tensorrt" and "not measurable" in rep["speed"] and "decode_ms" not in rep["stages"]["llm"]
    assert not [f for f in lint_bundle(out) if f.severity == "error"]
    assert other_target(M.load_manifest(out)) == ""
    assert rep["stages"]["llm"]["logits_cosine"] >= 0.999, rep["stages"]["llm"]


def test_tensorrt_refuses_and_lint_flags_the_ort_form(ort_int4, tmp_path):
    from setok.backends.trt.build import build_engines, other_target
    from setok.backends.trt.lint import lint_bundle

    out, _ = ort_int4
    errors = [f for f in lint_bundle(out) if f.severity == "error"]
    assert errors and all(f.stage == "llm" and "MatMulNBits" in f.message for f in errors)
    assert not [f for f in lint_bundle(out, target="onnxruntime-cpu") if f.severity == "error"]
    assert "onnxruntime-cpu" in other_target(M.load_manifest(out))
    with pytest.raises(InputError, match="MatMulNBits"):
        build_engines(out, tmp_path / "engines")


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "tensorrt"])
def test_int8_weight_forms(tiny_bundle, tmp_path, target):
    rep = _calibrate(tiny_bundle, tmp_path / "b", _spec(format="int8", target=target))
    entry, model = _graph(tmp_path / "b")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    if target == "tensorrt":  # per output channel: TensorRT's block quantization is int4-only
        dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        assert dq and all({a.name: a.i for a in n.attribute} == {"axis": 1} for n in dq)
        assert all(inits[n.input[0]].data_type == TensorProto.INT8 and len(inits[n.input[1]].dims) == 1 for n in dq)
        assert entry.extra["block_size"] is None
    else:
        nb = [n for n in g.node if n.op_type == "MatMulNBits"]
        assert nb and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nb)
        assert entry.extra["block_size"] == 32
    assert entry.precision == "int8" and entry.extra["weight_format"] == "int8"
    assert rep["stages"]["llm"]["cosine"] >= 0.999, rep["stages"]["llm"]


def _one_matmul(form_nodes, inits, opset=21):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 48])
    g = helper.make_graph(form_nodes, "g", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_the_dequantized_weights(bits):
    """Both forms compute x @ (q * scale) exactly as written (ORT, graph optimizations off)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    q, scales = W.rtn(w, bits, 32)
    deq = q.astype(np.float32) * np.repeat(scales, 32, axis=0)
    assert np.abs(deq - w).max() <= scales.max() / 2 + 1e-6  # round to nearest: half a step at most
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1 and (q == -(2 ** (bits - 1))).any()
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    for target in W.TARGETS:
        spec = _spec(format=f"int{bits}", accuracy_level=0, target=target)
        make = W.nbits_nodes if spec.form == W.NBITS else W.dq_nodes
        if spec.per_channel:
            q, scales = W.rtn(w, bits, 64)
            deq = q.astype(np.float32) * scales
        nodes, inits = make(mm, q, scales, spec, "mm")
        got = _one_matmul(nodes, inits).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4, err_msg=f"{target} int{bits}")


def test_int4_tensor_packing_reads_back():
    v = np.array([[-8, 7, 0], [1, -1, 3]], np.int8)
    t = helper.make_tensor("t", TensorProto.INT4, [2, 3], W.pack_int4(v), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t), v)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 64))
    x = rng.standard_normal((512, 64)) @ mix  # correlated features: where GPTQ's error feedback pays
    w = rng.standard_normal((64, 32)).astype(np.float32)
    h = x.T @ x
    errs = {}
    for name, (q, s) in {"rtn": W.rtn(w, 4, 32), "gptq": W.gptq(w, h, 4, 32)}.items():
        errs[name] = np.linalg.norm(x @ w - x @ (q.astype(np.float64) * np.repeat(s, 32, axis=0)))
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_gptq_on_the_bundle(tiny_bundle, tmp_path):
    rep = _calibrate(tiny_bundle, tmp_path / "g", _spec(algorithm="gptq"))["stages"]["llm"]
    entry, _ = _graph(tmp_path / "g")
    assert entry.extra["algorithm"] == "gptq" and entry.extra["n"] > 0
    assert rep["cosine"] >= 0.99 and rep["next_token_agreement"] >= 0.95, rep


def test_external_data_graphs(tiny_bundle, tmp_path):
    """A graph whose weights live outside the protobuf (as past 2 GB): read tensor by tensor, written
    with its own external-data file, same outputs as the inline graph's."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.load(str(tiny_bundle / "llm.onnx")), str(src / "llm.onnx"), save_as_external_data=True,
              location="llm.onnx.data", size_threshold=0)
    assert M.external_data(src / "llm.onnx") == ["llm.onnx.data"]
    spec = _spec()
    W.quantize_stage(src / "llm.onnx", tmp_path / "ext.onnx", spec, "llm", [])
    W.quantize_stage(tiny_bundle / "llm.onnx", tmp_path / "inline.onnx", spec, "llm", [])
    assert M.external_data(tmp_path / "ext.onnx") == ["ext.onnx.data"] and M.external_data(tmp_path / "inline.onnx") == []
    entry = M.load_manifest(tiny_bundle).stage("llm")
    from setok.backends.decode import prefill_feeds

    feed = prefill_feeds(entry, np.random.default_rng(0).standard_normal((1, 5, entry.inputs[0].shape[-1])).astype(np.float32))
    a = ort.InferenceSession(str(tmp_path / "ext.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(tmp_path / "inline.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_clear_errors(tiny_bundle, ort_int4, tmp_path):
    with pytest.raises(InputError, match="power of two"):
        _calibrate(tiny_bundle, tmp_path / "x", _spec(block_size=24))
    with pytest.raises(InputError, match="decoder stage.*add it to --stages"):
        _calibrate(tiny_bundle, tmp_path / "x", _spec(), stages=["encoder"])
    with pytest.raises(InputError, match="already quantized"):
        _calibrate(ort_int4[0], tmp_path / "x", _spec())
    with pytest.raises(InputError, match="awq writes int4"):
        _spec(format="int8", algorithm="awq").check()
    with pytest.raises(InputError, match="cannot take --llm-weights"):
        W.check_stage(onnx.load(str(tiny_bundle / "cluster.onnx")), "cluster", _spec())
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="nvidia-modelopt"):
            _calibrate(tiny_bundle, tmp_path / "x", _spec(algorithm="awq"))
    with pytest.raises(InputError, match="TensorRT cannot"):
        calibrate_bundle(tiny_bundle, tmp_path / "x", n=8, stages=["projector"], quantizer="dynamic", target="tensorrt")
    assert not (tmp_path / "x").exists()


def test_cli_error_is_one_line_exit_2(tiny_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "calibrate", str(tiny_bundle), "--out", str(tmp_path / "x"),
                           "--stages", "llm", "--llm-weights", "int4", "--block-size", "24", "--n", "8"],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "power of two" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: --block-size 24; expected a power of two >= 16 (MatMulNBits and TensorRT blocks)"], proc.stderr


def test_task_gate_covers_int4(tiny_bundle, tmp_path):
    """The task gate treats a weight-only stage as it does an INT8 one: an unreachable gate reverts it."""
    rep = _calibrate(tiny_bundle, tmp_path / "b", _spec(), stages=["projector", "llm"], task_gate=4, task_gates={"fg_ari": -1.0})
    assert [r["stage"] for r in rep["task_gate"]["reverted"]] == ["projector", "llm"]
    entry = M.load_manifest(tmp_path / "b").stage("llm")
    assert entry.precision == "fp32" and entry.file == "llm.onnx" and entry.extra["kept_float"].startswith("task gate: ")
    assert not list((tmp_path / "b").glob("llm.int4.onnx*"))


def test_task_gates_hold_with_int4(ort_int4, tiny_bundle):
    from setok.calibration.gate import GATE_SEED, TASK_GATES, misses
    from setok.eval.evaluation import evaluate_bundle

    ref, got = evaluate_bundle(tiny_bundle, n=8, seed=GATE_SEED), evaluate_bundle(ort_int4[0], n=8, seed=GATE_SEED)
    assert not misses(ref, got, TASK_GATES), misses(ref, got, TASK_GATES)


def test_target_tensorrt_keeps_qdq_by_the_accuracy_gate(tiny_bundle, tmp_path):
    rep = calibrate_bundle(tiny_bundle, tmp_path / "a", n=8, stages=["projector"], task_gate=0, target="tensorrt")
    r, entry = rep["stages"]["projector"], M.load_manifest(tmp_path / "a").stage("projector")
    assert entry.precision == "int8" and entry.extra["target"] == "tensorrt" and "fp32_ms" not in r
    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["projector"], task_gate=0, target="tensorrt", gate=(1.0, 0.0))
    entry = M.load_manifest(tmp_path / "b").stage("projector")
    assert entry.precision == "fp32" and entry.extra["kept_float"].startswith("accuracy gate: ")
    assert entry.extra["target"] == "tensorrt"


def test_parity_int4(tiny_ckpt, ort_int4):
    from setok.export.parity import run_parity

    result = run_parity(tiny_ckpt, ort_int4[0], n=2, precision="int4")
    assert result["passed"], result.get("failures")
