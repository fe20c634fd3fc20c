"""Graphs past protobuf's 2 GB keep their weights in external data: the file is named in the
manifest with its sha256, checked like every other file, and the tools read the graph without it.
The tiny LLM is externalised by lowering the threshold (the same code path a 1B LLM takes)."""

import shutil

import numpy as np
import pytest

from setok import manifest as M
from setok.backends.trt.lint import lint_bundle
from setok.data.items import eval_items
from setok.errors import BundleError
from setok.runtime import Pipeline


@pytest.fixture(scope="module")
def external_bundle(tiny_ckpt, tmp_path_factory):
    from setok.export import llm
    from setok.export.onnx import export_bundle

    mp = pytest.MonkeyPatch()
    mp.setattr(llm, "EXTERNAL_DATA_BYTES", 0)
    try:
        return export_bundle(tiny_ckpt, tmp_path_factory.mktemp("ext") / "b")
    finally:
        mp.undo()


def test_the_data_file_is_in_the_manifest(external_bundle):
    entry = M.load_manifest(external_bundle).stage("llm")
    assert [d["file"] for d in entry.data] == ["llm.onnx.data"]
    assert entry.data[0]["sha256"] == M.sha256(external_bundle / "llm.onnx.data")
    assert (external_bundle / "llm.onnx.data").stat().st_size > (external_bundle / "llm.onnx").stat().st_size
    assert M.external_data(external_bundle / "llm.onnx") == ["llm.onnx.data"]


def test_it_answers_like_the_inline_bundle(external_bundle, tiny_bundle):
    a, b = Pipeline.open(tiny_bundle, threads=1), Pipeline.open(external_bundle, threads=1)
    for it in eval_items(3, seed=9):
        assert a.caption(it.image).token_ids == b.caption(it.image).token_ids


def test_a_modified_data_file_is_refused(external_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(external_bundle, bad)
    data = bad / "llm.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="llm.onnx.data has sha256"):
        Pipeline.open(bad)
    data.unlink()
    with pytest.raises(BundleError, match="llm.onnx.data is missing"):
        Pipeline.open(bad)


def test_lint_and_triton_handle_it(external_bundle, tmp_path):
    from setok.serve import export_triton

    findings = lint_bundle(external_bundle)
    assert not [f for f in findings if f.stage == "llm" and f.severity == "error"], findings
    repo = export_triton(external_bundle, tmp_path / "repo")
    assert (repo / "llm" / "1" / "llm.onnx.data").is_file()


def test_calibration_copies_it(external_bundle, tmp_path):
    from setok.calibration import calibrate_bundle

    out = tmp_path / "q"
    calibrate_bundle(external_bundle, out, n=8, stages=["projector"], speed_gate=False, task_gate=0)
    m = M.load_manifest(out)  # verifies every file, the llm's data too
    assert m.stage("llm").data == M.load_manifest(external_bundle).stage("llm").data
    np.testing.assert_array_equal(np.load(out / "llm_embeddings.npy"), np.load(external_bundle / "llm_embeddings.npy"))
