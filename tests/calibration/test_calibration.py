"""INT8 calibration on the tiny bundle: real ORT sessions, real Q/DQ graphs, real range files."""

import json
import math

import numpy as np
import onnx
import pytest

from setok import manifest as M
from setok.calibration import calibrate_bundle
from setok.calibration import feeds as D
from setok.calibration import ranges as R
from setok.errors import InputError, MissingDependency

QUANTIZED = ["encoder", "merger", "projector", "llm", "regress_head", "seg_head", "detokenizer"]


@pytest.fixture(scope="module")
def int8(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "b"
    return out, calibrate_bundle(tiny_bundle, out, n=16, method="minmax", speed_gate=False, task_gate=0)


@pytest.fixture(scope="module")
def encoder_feeds(tiny_bundle):
    from setok.runtime.pipeline import Pipeline

    pipe = Pipeline.open(tiny_bundle, threads=1)
    return D.collect_feeds(pipe, D.load_samples("synthetic", 16, pipe.size, 0), ["encoder"])["encoder"]


def _graph(path):
    return onnx.load(str(path)).graph


def test_manifest_precision_and_files(int8):
    out, report = int8
    m = M.load_manifest(out)  # verifies every sha256
    for s in m.stages:
        assert s.precision == ("int8" if s.name in QUANTIZED else "fp32"), s.name
        if s.name in QUANTIZED:
            assert s.extra["method"] == "minmax" and s.extra["excluded"] == []
    for st in QUANTIZED:
        assert {f"ranges.{st}", f"calib_table.{st}"} <= set(m.files)
        assert report["stages"][st]["n"] == 16 and sum(report["stages"][st]["quantized_ops"].values()) > 0


def test_qdq_placement(int8):
    out, _ = int8
    m = M.load_manifest(out)
    for s in m.stages:
        g = _graph(out / s.file)
        ops = [n.op_type for n in g.node]
        if s.name in ("cluster", "cluster_plugin"):
            assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
            continue
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, s.name
        consumers = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n.op_type)
        q_out = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
        dq_targets = {op for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out
                      for op in consumers.get(n.output[0], [])}
        # LayerNorm / Softmax / residual Adds (and the decomposed-LayerNorm ops) never read a
        # dequantized activation. (A quantized graph input keeps one shared Q/DQ pair: ORT makes no
        # dedicated pairs for graph inputs, so e.g. the detokenizer's Slice of vision_tokens reads it.)
        float_only = {"LayerNormalization", "Softmax", "Add", "ReduceMean", "Sub", "Pow", "Div", "Sqrt"}
        assert not dq_targets & float_only, (s.name, dq_targets)
        assert {"MatMul", "Gemm", "Conv"} & dq_targets, s.name
        assert any(n.op_type in ("MatMul", "Gemm", "Conv") and any(c == "DequantizeLinear" for c in
                   [p.op_type for p in g.node if set(p.output) & set(n.input)]) for n in g.node)


def test_range_files_parse_and_cover(int8):
    out, report = int8
    m = M.load_manifest(out)
    for st in QUANTIZED:
        table = json.loads((out / m.files[f"ranges.{st}"]["file"]).read_text())
        version, scales = R.parse_trt_calib_table((out / m.files[f"calib_table.{st}"]["file"]).read_text())
        assert version == R.TRT_VERSION and set(scales) == set(table)
        for name, e in table.items():
            assert all(math.isfinite(v) for v in e.values()) and e["min"] <= e["max"]
            assert e["amax"] == pytest.approx(max(abs(e["min"]), abs(e["max"])))
            assert scales[name] == pytest.approx(max(e["scale"], 1e-38), rel=1e-6)
        g = _graph(out / m.stage(st).file)
        inits = {i.name for i in g.initializer}
        activations = {n.input[0].removesuffix("_QuantizeLinear_Input") for n in g.node
                       if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
        io = {t.name for t in list(g.input) + list(g.output) if t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        missing = (activations | io) - set(table) - set(report["stages"][st]["unranged"])
        assert not missing, (st, missing)


def test_entropy_and_percentile_differ_from_minmax(tiny_bundle, encoder_feeds, tmp_path):
    model = tiny_bundle / "encoder.onnx"
    mm = R.compute_ranges(model, encoder_feeds, "minmax", ["MatMul", "Gemm", "Conv"], tmp_path)
    ent = R.compute_ranges(model, encoder_feeds, "entropy", ["MatMul", "Gemm", "Conv"], tmp_path)
    pct = R.compute_ranges(model, encoder_feeds, "percentile", ["MatMul", "Gemm", "Conv"], tmp_path)
    assert set(mm) == set(ent) == set(pct)
    assert any(ent[k] != mm[k] for k in mm), "entropy collapsed to MinMax (num_bins == num_quantized_bins?)"
    assert any(pct[k] != mm[k] for k in mm)
    for k in mm:
        amax = max(abs(v) for v in mm[k])
        assert max(abs(v) for v in pct[k]) <= amax * (1 + 1e-6), k


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_methods_write_a_bundle(tiny_bundle, tmp_path, method):
    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, method=method, stages=["encoder", "projector"], speed_gate=False, task_gate=0)
    m = M.load_manifest(tmp_path / "b")
    assert m.stage("encoder").extra["method"] == method and m.stage("merger").precision == "fp32"
    assert set(rep["stages"]) == {"encoder", "projector"}
    assert all(s["cosine"] >= 0.99 for s in rep["stages"].values()), rep["stages"]


def test_int8_matches_fp32_on_heldout(int8, tiny_bundle):
    from setok.runtime.pipeline import Pipeline

    out, report = int8
    # Measured on held-out eval scenes (tiny model, n=16): every stage >= 0.994.
    for st in QUANTIZED:
        assert report["stages"][st]["cosine"] >= 0.99, (st, report["stages"][st])
        assert abs(report["stages"][st]["norm_ratio"] - 1) <= 0.02, (st, report["stages"][st])
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (200, 40, 40)
    pipe = Pipeline.open(out, threads=1)
    assert isinstance(pipe.caption(img, max_new_tokens=4).text, str)
    a, b = pipe.tokenize(img), Pipeline.open(tiny_bundle, threads=1).tokenize(img)
    assert a.num_tokens == b.num_tokens  # the cluster stage is float and sees near-identical features


def test_auto_exclude_records_nodes(tiny_bundle, tmp_path):
    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["projector"], auto_exclude=True,
                           gate=(1.0, 0.0), speed_gate=False, task_gate=0)  # unreachable gate: excludes up to the 25% cap
    ex = M.load_manifest(tmp_path / "b").stage("projector").extra["excluded"]
    assert ex and ex == rep["stages"]["projector"]["excluded"]
    assert all(set(e) == {"node", "cosine"} and e["cosine"] <= 1.0 for e in ex)
    import onnx

    graph = onnx.load(str(tiny_bundle / M.load_manifest(tiny_bundle).stage("projector").file)).graph
    linear = sum(n.op_type in ("Gemm", "MatMul") for n in graph.node)
    assert sum(rep["stages"]["projector"]["quantized_ops"].values()) == linear - len(ex)  # excluded ones stay float


def test_gate_logic():
    from setok.calibration.agreement import agreement as _agreement
    from setok.calibration.agreement import passes as _passes

    x = [np.arange(1, 11, dtype=np.float32)]
    assert _agreement(x, x) == pytest.approx((1.0, 1.0))
    assert _passes(0.995, 1.01, (0.99, 0.02)) and not _passes(0.995, 1.03, (0.99, 0.02))
    assert not _passes(0.98, 1.0, (0.99, 0.02))


def test_errors(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="at least 8"):
        calibrate_bundle(tiny_bundle, tmp_path / "x", n=4)
    with pytest.raises(InputError, match="valid stages.*encoder"):
        calibrate_bundle(tiny_bundle, tmp_path / "x", n=8, stages=["cluster"])
    with pytest.raises(InputError, match="valid stages"):
        calibrate_bundle(tiny_bundle, tmp_path / "x", n=8, stages=["nope"])
    with pytest.raises(InputError, match="method"):
        calibrate_bundle(tiny_bundle, tmp_path / "x", n=8, method="kl")
    assert not (tmp_path / "x").exists()


def test_folder_errors(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(InputError, match=str(folder)):
        D.load_samples(str(folder), 8, 64, 0)
    for i in range(3, 9):
        Image.new("RGB", (20, 20), (0, i * 20, 0)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png"):
        D.load_samples(str(folder), 16, 64, 0)
    assert len(D.load_samples(str(folder), 8, 64, 0)) == 8


def test_modelopt_missing(tiny_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="nvidia-modelopt"):
            calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["projector"], quantizer="modelopt")
    else:
        pytest.skip("modelopt is installed")


def test_speed_gate_keeps_slower_stages_float(tiny_bundle, tmp_path):
    """Where INT8 is not faster than fp32 here, the stage stays float and the manifest says why."""
    from setok.runtime.pipeline import Pipeline

    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["encoder", "merger"], task_gate=0)
    m = M.load_manifest(tmp_path / "b")
    for name in ("encoder", "merger"):
        r, entry = rep["stages"][name], m.stage(name)
        assert r["fp32_ms"] > 0 and r["int8_ms"] > 0
        if "kept_float" in r:
            assert entry.precision == "fp32" and entry.file == f"{name}.onnx" and "kept_float" in entry.extra
        else:
            assert entry.precision == "int8" and r["int8_ms"] < 0.95 * r["fp32_ms"]
    Pipeline.open(tmp_path / "b").caption(np.zeros((64, 64, 3), np.uint8), max_new_tokens=2)


def test_task_gate_reverts_int8_stages_upstream_first(tiny_bundle, tmp_path):
    """An unreachable task gate reverts every INT8 stage, upstream first, and says why."""
    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["merger", "detokenizer"], speed_gate=False,
                           task_gate=4, task_gates={"fg_ari": -1.0})
    gate = rep["task_gate"]
    assert not gate["passed"] and [r["stage"] for r in gate["reverted"]] == ["merger", "detokenizer"]
    m = M.load_manifest(tmp_path / "b")
    for name in ("merger", "detokenizer"):
        entry = m.stage(name)
        assert entry.precision == "fp32" and entry.extra["kept_float"].startswith("task gate: fg_ari")
    assert not list((tmp_path / "b").glob("*.int8.onnx"))


def test_task_gate_keeps_int8_when_every_gate_holds(tiny_bundle, tmp_path):
    """Constructed to pass: gates no drop can exceed. The stage must stay INT8, nothing reverted."""
    from setok.calibration.gate import TASK_GATES

    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["projector"], speed_gate=False, task_gate=4,
                           task_gates={k: math.inf for k in TASK_GATES})
    gate = rep["task_gate"]
    assert gate["passed"] is True and gate["reverted"] == []
    assert set(gate["fp32"]) == set(gate["int8"]) == set(TASK_GATES)
    entry = M.load_manifest(tmp_path / "b").stage("projector")
    assert entry.precision == "int8" and "kept_float" not in entry.extra


def _gate(tiny_bundle, tmp_path, monkeypatch, drop: float, broken_by: tuple[str, ...] | None):
    """The task gate on a constructed case: a candidate whose encoder, merger and projector are INT8
    (copies of the fp32 graphs), and an evaluation that drops fg_ari by `drop` while a stage of
    `broken_by` is still INT8 in the manifest the gate rewrites (always, with None)."""
    import shutil
    from pathlib import Path

    import setok.eval.evaluation as EV
    from setok.calibration.gate import TASK_GATES, apply_task_gate

    cand = tmp_path / "cand"
    shutil.copytree(tiny_bundle, cand)
    manifest = M.load_manifest(cand)
    for e in manifest.stages:
        if e.name in ("encoder", "merger", "projector"):
            shutil.copy(cand / e.file, cand / f"{e.name}.int8.onnx")
            e.file, e.precision = f"{e.name}.int8.onnx", "int8"
            e.sha256 = M.sha256(cand / e.file)
    manifest.write(cand)
    ref = {k: 0.5 for k in TASK_GATES}
    calls = []

    def evaluate(bundle, n, seed):
        calls.append(Path(bundle))
        if Path(bundle) == Path(tiny_bundle):
            return dict(ref)
        m = M.load_manifest(bundle)  # verifies what the gate wrote, and the metrics follow it
        broken = broken_by is None or any(m.stage(s).precision == "int8" for s in broken_by)
        return {**ref, "fg_ari": ref["fg_ari"] - (drop if broken else 0.0)}

    monkeypatch.setattr(EV, "evaluate_bundle", evaluate)
    report = apply_task_gate(tiny_bundle, cand, manifest, 4)
    return report, M.load_manifest(cand), calls


def test_task_gate_passes_a_drop_within_the_allowance(tiny_bundle, tmp_path, monkeypatch):
    from setok.calibration.gate import TASK_GATES

    report, m, calls = _gate(tiny_bundle, tmp_path, monkeypatch, TASK_GATES["fg_ari"] / 2, ("merger",))
    assert report["passed"] is True and report["reverted"] == []
    assert [m.stage(s).precision for s in ("encoder", "merger", "projector")] == ["int8"] * 3
    assert len(calls) == 2, "the reference and the candidate, evaluated once each"


def test_task_gate_reverts_upstream_first_until_the_drop_is_gone(tiny_bundle, tmp_path, monkeypatch):
    """The merger's INT8 costs 0.05 fg_ari (allowed 0.02): the encoder goes back first (upstream),
    then the merger; the gate then holds and the projector stays INT8."""
    report, m, calls = _gate(tiny_bundle, tmp_path, monkeypatch, 0.05, ("merger",))
    assert report["passed"] is True and [r["stage"] for r in report["reverted"]] == ["encoder", "merger"]
    assert [m.stage(s).precision for s in ("encoder", "merger", "projector")] == ["fp32", "fp32", "int8"]
    assert m.stage("merger").file == "merger.onnx" and not (tmp_path / "cand" / "merger.int8.onnx").exists()
    assert m.stage("merger").extra["kept_float"] == "task gate: fg_ari 0.5000 -> 0.4500 (drop 0.0500 > 0.02)"
    assert report["int8"]["fg_ari"] == 0.5 and len(calls) == 4


def test_task_gate_fails_when_reverting_everything_does_not_help(tiny_bundle, tmp_path, monkeypatch):
    report, m, _ = _gate(tiny_bundle, tmp_path, monkeypatch, 0.05, None)
    assert report["passed"] is False
    assert [r["stage"] for r in report["reverted"]] == ["encoder", "merger", "projector"]
    assert all(s.precision == "fp32" for s in m.stages)


def test_task_gate_boundary():
    from setok.calibration.gate import misses

    assert misses({"a": 1.0}, {"a": 0.75}, {"a": 0.25}) == []  # a drop equal to the allowance passes
    assert misses({"a": 1.0}, {"a": 0.5}, {"a": 0.25}) == ["a 1.0000 -> 0.5000 (drop 0.5000 > 0.25)"]
    assert misses({"a": 1.0}, {"a": 2.0}, {"a": 0.0}) == []  # a gain is never a miss


def test_dynamic_quantizer_writes_a_cpu_int8_bundle_tensorrt_refuses(tiny_bundle, tmp_path):
    """--quantizer dynamic: int8 weights, activations quantized per run; no Q/DQ, no range files."""
    from setok.backends.trt.build import build_engines
    from setok.runtime.pipeline import Pipeline

    rep = calibrate_bundle(tiny_bundle, tmp_path / "b", n=8, stages=["encoder", "llm"], quantizer="dynamic",
                           speed_gate=False, task_gate=0)
    m = M.load_manifest(tmp_path / "b")
    for name in ("encoder", "llm"):
        r, entry = rep["stages"][name], m.stage(name)
        assert entry.precision == "int8" and entry.extra["quantizer"] == "dynamic"
        assert r["quantized_ops"].get("MatMulInteger", 0) > 0 and r["activation_ranges"] == "per run (dynamic)"
        assert r["cosine"] >= 0.99, r
        ops = {n.op_type for n in _graph(tmp_path / "b" / entry.file).node}
        assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert not list((tmp_path / "b").glob("calibration/*"))
    img = np.zeros((64, 64, 3), np.uint8)
    img[8:40, 20:50] = (30, 200, 60)
    a, b = Pipeline.open(tmp_path / "b").tokenize(img), Pipeline.open(tiny_bundle).tokenize(img)
    assert a.num_tokens == b.num_tokens
    with pytest.raises(InputError, match="dynamically quantized"):
        build_engines(tmp_path / "b", tmp_path / "engines")


def test_weight_bits_follow_the_cpu(int8):
    """7-bit weights where ORT's x86 int8 GEMM would saturate (no VNNI), 8 elsewhere; recorded."""
    from onnx import numpy_helper

    from setok.calibration.quantize import weight_reduce_range

    out, report = int8
    bits = 7 if weight_reduce_range() else 8
    assert report["weight_bits"] == bits
    m = M.load_manifest(out)
    for st in QUANTIZED:
        entry = m.stage(st)
        assert entry.extra["weight_bits"] == bits, st
        ints = [numpy_helper.to_array(t) for t in _graph(out / entry.file).initializer if t.data_type == onnx.TensorProto.INT8]
        peak = max(int(np.abs(w.astype(np.int32)).max()) for w in ints if w.size > 1)
        assert 2 ** (bits - 2) < peak <= 2 ** (bits - 1), (st, peak)
