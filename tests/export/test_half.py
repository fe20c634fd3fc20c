"""`setok export --dtype fp16`: float16 weights inside, float32 at the graph's edges, the
clustering kept fp32, every converted stage validated with its fp16 gates at export, and the
bundle running and passing `setok parity --precision fp16`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from setok import manifest as M
from setok.backends.trt.build import plan_stage
from setok.data.items import eval_items
from setok.export.stages import STAGES
from setok.runtime import Pipeline

FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def half_bundle(tiny_ckpt, tmp_path_factory):
    from setok.export import llm
    from setok.export.onnx import export_bundle

    mp = pytest.MonkeyPatch()
    mp.setattr(llm, "EXTERNAL_DATA_BYTES", 0)  # the LLM takes the > 2 GB path (external data)
    try:
        return export_bundle(tiny_ckpt, tmp_path_factory.mktemp("half") / "b", dtype="fp16")
    finally:
        mp.undo()


def _initializer_types(path) -> set[int]:
    m = onnx.load(str(path), load_external_data=False)
    return {t.data_type for t in m.graph.initializer if t.data_type in (FLOAT, HALF) and len(t.dims)}


def test_stages_that_may_are_half_inside_and_float_at_the_edges(half_bundle):
    m = M.load_manifest(half_bundle)
    for entry in m.stages:
        half = STAGES[entry.name].half
        assert entry.precision == ("fp16" if half else "fp32"), entry.name
        graph = onnx.load(str(half_bundle / entry.file), load_external_data=False).graph
        kinds = {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
        assert HALF not in kinds, f"{entry.name}: the graph's I/O stays float32"
        if half:  # every weight matrix is float16
            assert _initializer_types(half_bundle / entry.file) == {HALF}, entry.name
    assert {e.name for e in m.stages if e.precision == "fp32"} == {"cluster", "cluster_plugin"}


def test_the_half_llm_keeps_its_weights_outside_and_hashed(half_bundle, tiny_bundle):
    entry = M.load_manifest(half_bundle).stage("llm")
    assert [d["file"] for d in entry.data] == ["llm.onnx.data"]
    assert entry.data[0]["sha256"] == M.sha256(half_bundle / "llm.onnx.data")
    fp32 = (tiny_bundle / "llm.onnx").stat().st_size
    assert (half_bundle / "llm.onnx.data").stat().st_size < 0.6 * fp32, "half the bytes of the fp32 weights"


def test_it_answers_like_the_fp32_bundle(half_bundle, tiny_bundle):
    a, b = Pipeline.open(tiny_bundle, threads=1), Pipeline.open(half_bundle, threads=1)
    same = 0
    for it in eval_items(6, seed=9):
        ta, tb = a.tokenize(it.image), b.tokenize(it.image)
        assert ta.tokens.dtype == tb.tokens.dtype == np.float32
        if ta.num_tokens == tb.num_tokens:  # a near-tie density can move a center
            cos = float(ta.tokens.ravel() @ tb.tokens.ravel() / (np.linalg.norm(ta.tokens) * np.linalg.norm(tb.tokens)))
            assert cos > 0.999, cos
        same += a.answer(it.image, "how many objects are there").text == b.answer(it.image, "how many objects are there").text
    assert same >= 5, f"{same}/6 answers equal"


def test_parity_passes_with_the_fp16_gates_on_fp16_sized_errors(half_bundle, tiny_ckpt, tmp_path):
    """The fp16 gates pass, on a comparison that really ran the half graphs: the encoder's error is
    fp16-sized (~1e-3; an fp32 bundle's is ~1e-6). Whether the fp32 gates also fail is up to chance: a
    16-step checkpoint's clustering and greedy tokens may or may not flip, and fp16 rounding alone
    keeps cosine above 0.99999 (1 - cos ~ e^2 / 2 for e ~ 3e-4)."""
    out = tmp_path / "parity.json"
    half = subprocess.run([sys.executable, "-m", "setok.cli", "parity", str(tiny_ckpt), str(half_bundle), "--n", "3",
                           "--precision", "fp16", "--json", str(out)], capture_output=True, text=True, check=False)
    assert half.returncode == 0 and "PASS" in half.stdout, half.stdout[-2000:] + half.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["stages"]["encoder"]["patch_features"]["max_abs"] > 1e-4, result["stages"]["encoder"]


def test_tensorrt_builds_a_half_graph_as_such():
    plan = plan_stage("encoder", "fp16", "fp32", trt_major=10)
    assert plan.precision == "fp16" and plan.strongly_typed and "float16" in plan.note
    assert plan_stage("encoder", "fp16", "fp16", trt_major=11).note == ""


def test_streamed_half_equals_the_converters_own(tiny_bundle, tmp_path):
    """A graph with external data is converted without loading its weights (export/half.py): the
    result is the ORT converter's in-memory conversion, node for node and byte for byte."""
    import shutil

    import torch

    from setok.export.external import attach_external
    from setok.export.half import to_fp16

    inline, external = tmp_path / "inline" / "llm.onnx", tmp_path / "external" / "llm.onnx"
    for p in (inline, external):
        p.parent.mkdir()
        shutil.copy(tiny_bundle / "llm.onnx", p)
    # The same graph with its initializers moved to llm.onnx.data.
    m = onnx.load(str(external))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    del m.graph.initializer[:]
    m.graph.input.extend(onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(w.dtype), w.shape)
                         for n, w in weights.items())
    onnx.save(m, str(external))
    attach_external(external, {n: torch.from_numpy(w.copy()) for n, w in weights.items()})
    assert M.external_data(external) == ["llm.onnx.data"]
    to_fp16(inline)
    to_fp16(external)
    a, b = onnx.load(str(inline)), onnx.load(str(external))
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    assert sum(w.dtype == np.float16 for w in wb.values()) > 10
    for name, w in wa.items():
        assert wb[name].dtype == w.dtype and np.array_equal(wb[name], w), name
    assert sorted(p.name for p in external.parent.iterdir()) == ["llm.onnx", "llm.onnx.data"]


def test_newest_token_logits_compose_with_fp16(tiny_ckpt, tmp_path):
    """`--dtype fp16 --llm-logits newest`: the LM head for the newest token only, in half weights; the
    manifest says both and the bundle passes the fp16 gates end to end."""
    from setok.export.onnx import export_bundle

    bundle = export_bundle(tiny_ckpt, tmp_path / "b", dtype="fp16", logits="newest")
    llm = M.load_manifest(bundle).stage("llm")
    assert llm.precision == "fp16" and llm.extra["logits"] == "newest"
    run = subprocess.run([sys.executable, "-m", "setok.cli", "parity", str(tiny_ckpt), str(bundle), "--n", "3",
                          "--precision", "fp16"], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "PASS" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
