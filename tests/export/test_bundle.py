"""The exported bundle: manifest schema, every stage present and valid, tools can run it."""

import json
import shutil
import subprocess

import onnx
import pytest
import torch

from setok import manifest as M
from setok.errors import CheckpointError
from setok.export.onnx import export_bundle
from setok.export.stages import STAGES, flow, register
from setok.export.validate import ValidationError
from setok.model.setokim import Setokim


def test_manifest_schema(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["schema_version"] == M.SCHEMA_VERSION and m["setok_version"]
    assert {"size", "mean", "std", "resize"} <= set(m["preprocessing"])
    assert m["config"]["encoder"]["image_size"] == m["preprocessing"]["size"]
    names = [s["name"] for s in m["stages"]]
    assert names == [s for s in STAGES], "every registered stage, in pipeline order"
    for s in m["stages"]:
        assert {"name", "file", "sha256", "precision", "opset", "inputs", "outputs"} <= set(s)
        assert not s["file"].startswith("/") and ".." not in s["file"]
        assert s["sha256"] == M.sha256(tiny_bundle / s["file"])
        for t in s["inputs"] + s["outputs"]:
            assert {"name", "dtype", "shape"} == set(t)


def test_manifest_names_match_the_onnx_graphs(tiny_bundle):
    for entry in M.load_manifest(tiny_bundle).stages:
        g = onnx.load(str(tiny_bundle / entry.file)).graph
        assert [i.name for i in g.input] == [t.name for t in entry.inputs], entry.name
        assert [o.name for o in g.output] == [t.name for t in entry.outputs], entry.name


def test_cluster_contract(tiny_bundle):
    entry = M.load_manifest(tiny_bundle).stage("cluster")
    assert [(t.name, t.dtype) for t in entry.outputs] == [("assignment", "int64"), ("num_tokens", "int64"), ("centers", "int64")]
    assert entry.inputs[0].name == "patch_features" and entry.inputs[0].dtype == "float32"
    plugin = onnx.load(str(tiny_bundle / "cluster_plugin.onnx"))
    (node,) = plugin.graph.node
    assert (node.domain, node.op_type) == ("setok", "DensityPeakCluster")
    assert {a.name for a in node.attribute} == {"k", "tau", "min_tokens", "max_tokens", "plugin_namespace",
                                                 "plugin_version", "aot"}
    standard = onnx.load(str(tiny_bundle / "cluster.onnx"))
    assert {n.domain for n in standard.graph.node} <= {""}, "standard ONNX ops only"


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        register(STAGES["encoder"])


def test_validation_names_the_failing_stage_and_output(tiny_ckpt, tmp_path):
    model = Setokim.from_pretrained(tiny_ckpt)
    st = STAGES["detokenizer"]
    example = st.example(flow(model))
    path = st.export(st, model, tmp_path, 17, example)
    st.validate(st, model, path, example)
    with torch.no_grad():
        model.vision.detokenizer.head.weight.mul_(1.5)  # what a stale or wrong export looks like
    with pytest.raises(ValidationError, match="detokenizer.*image"):
        st.validate(st, model, path, example)


def test_failed_export_leaves_old_bundle(tiny_ckpt, tiny_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError):
        export_bundle(bad, dest)
    assert M.load_manifest(dest).stages, "the old complete bundle is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "bundle"], "no temp directory left"


def _polygraphy_shapes(entry, cfg) -> list[str]:
    sizes = {"batch": 1, "num_patches": cfg["encoder"]["image_size"] ** 2 // cfg["encoder"]["patch_size"] ** 2,
             "tokens": 5, "sequence": 4, "past_sequence": 0, "total_sequence": 4}
    return [f"{t.name}:[{','.join(str(sizes.get(d, d)) for d in t.shape)}]" for t in entry.inputs]


@pytest.mark.parametrize("name", [s for s in STAGES if s != "cluster_plugin"])
def test_polygraphy_runs_every_stage(tiny_bundle, name):
    """Other tools can use the files. encoder and cluster need no arguments at all; the plugin
    form needs our custom-op library, which `polygraphy run --onnxrt` cannot load."""
    m = M.load_manifest(tiny_bundle)
    entry = m.stage(name)
    args = [] if name in ("encoder", "cluster") else ["--input-shapes", *_polygraphy_shapes(entry, m.config)]
    proc = subprocess.run([shutil.which("polygraphy") or "polygraphy", "run", str(tiny_bundle / entry.file), "--onnxrt", *args],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
