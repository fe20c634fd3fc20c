"""The Triton model repository written from the tiny bundle: configs, files, ONNX I/O, model.py."""

from __future__ import annotations

import ast
import importlib.util
import py_compile
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from setok import manifest as M
from setok.errors import InputError
from setok.serve import export_triton
from setok.serve.triton import PIPELINE_MODEL, is_batchable, skipped_stages

ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FLOAT16": "TYPE_FP16"}


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory) -> Path:
    return export_triton(tiny_bundle, tmp_path_factory.mktemp("triton") / "repo")


# ---- reading config.pbtxt -----------------------------------------------------------------------
def triton_schema():
    """Triton's ModelConfig message class from tritonclient, or None when tritonclient is missing."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient.grpc raises RuntimeError when grpcio is missing
        spec = importlib.util.find_spec("tritonclient")
        if spec is None or not spec.submodule_search_locations:
            return None
        # The generated module needs only protobuf: load it without the grpc package around it.
        path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
        module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
        model_config_pb2 = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(model_config_pb2)
    return model_config_pb2.ModelConfig


def load_config(path: Path) -> dict:
    """Parse with Triton's own ModelConfig schema when tritonclient is installed (unknown fields and
    wrong enum values fail there); otherwise with the structural text-format parser below."""
    schema = triton_schema()
    if schema is None:
        return parse_pbtxt(path.read_text())
    from google.protobuf import json_format, text_format

    msg = text_format.Parse(path.read_text(), schema())
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z_][\w.]*|-?\d+(?:\.\d+)?))')


def parse_pbtxt(text: str) -> dict:
    """A small protobuf text-format parser: messages, repeated `[..]` lists, scalars and enums."""
    tokens = [m.group(m.lastindex) for m in TOKEN.finditer(text) if m.lastindex]
    assert "".join(TOKEN.sub("", text).split()) == "", "unparsable characters in config.pbtxt"
    msg, rest = _message(tokens, 0)
    assert rest == len(tokens), f"trailing tokens {tokens[rest:rest + 5]}"
    return msg


def _message(tok: list[str], i: int, end: str | None = None) -> tuple[dict, int]:
    out: dict = {}
    while i < len(tok) and tok[i] != end:
        name = tok[i]
        assert re.fullmatch(r"[A-Za-z_]\w*", name), f"expected a field name, got {name!r}"
        i += 2 if tok[i + 1] == ":" else 1
        value, i = _value(tok, i)
        out[name] = out[name] + (value if isinstance(value, list) else [value]) if name in out else value
    return out, i + (1 if end else 0)


def _value(tok: list[str], i: int):
    if tok[i] == "{":
        return _message(tok, i + 1, "}")
    if tok[i] == "[":
        items, i = [], i + 1
        while tok[i] != "]":
            item, i = _value(tok, i)
            items.append(item)
            i += 1 if tok[i] == "," else 0
        return items, i + 1
    t = tok[i]
    return (t[1:-1] if t.startswith('"') else int(t) if re.fullmatch(r"-?\d+", t) else t), i + 1


def configs(repo: Path) -> dict[str, dict]:
    return {p.parent.name: load_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


# ---- the repository -----------------------------------------------------------------------------
def test_one_model_per_stage_and_the_pipeline(repo, tiny_bundle):
    manifest = M.load_manifest(tiny_bundle)
    stages = [s.name for s in manifest.stages]
    assert set(skipped_stages(manifest)) == {"cluster_plugin"}  # the custom-op form, derived from the manifest
    expected = {s for s in stages if s not in skipped_stages(manifest)} | {PIPELINE_MODEL}
    assert set(configs(repo)) == expected
    assert "cluster_plugin" in stages and not (repo / "cluster_plugin").exists()
    assert "cluster_plugin" in (repo / "README.md").read_text()


def test_every_config_parses_and_names_its_model(repo):
    for name, cfg in configs(repo).items():
        assert cfg["name"] == name
        assert int(cfg.get("max_batch_size", 0)) == 0
        assert "dynamic_batching" not in cfg  # with max_batch_size 0 Triton batches nothing
        groups = cfg["instance_group"]
        assert len(groups) == 1 and groups[0]["kind"] in ("KIND_CPU", "KIND_GPU") and int(groups[0]["count"]) == 1


def test_configs_parse_with_tritons_own_schema(repo):
    if triton_schema() is None:
        pytest.skip("tritonclient is not installed: configs were checked by the structural parser only")
    from google.protobuf import text_format

    for path in repo.glob("*/config.pbtxt"):
        text_format.Parse(path.read_text(), triton_schema()())  # raises on any unknown field or enum
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x"\nmax_batch_size: 0\nbogus_field: 1\n', triton_schema()())


def test_structural_parser_agrees_with_the_schema(repo):
    if triton_schema() is None:
        pytest.skip("tritonclient is not installed")
    for path in repo.glob("*/config.pbtxt"):
        strict, loose = load_config(path), parse_pbtxt(path.read_text())
        for side in ("input", "output"):
            assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in strict[side]] == \
                   [(t["name"], t["data_type"], t["dims"]) for t in loose[side]]


def test_stage_io_matches_the_onnx_graphs(repo):
    import onnx

    for name, cfg in configs(repo).items():
        if name == PIPELINE_MODEL:
            continue
        assert cfg["platform"] == "onnxruntime_onnx"
        graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
        for side, values in (("input", graph.input), ("output", graph.output)):
            want = [(v.name, ONNX_TO_TRITON[onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)],
                     [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                    for v in values]
            got = [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in cfg[side]]
            assert got == want, f"{name} {side}s"


def test_batching_advice_follows_the_shapes(repo, tiny_bundle):
    m = M.load_manifest(tiny_bundle)
    batchable = {s.name for s in m.stages if is_batchable(s.inputs + s.outputs)}
    assert {"encoder", "cluster", "merger", "detokenizer"} <= batchable
    assert not batchable & {"llm", "projector", "seg_head", "regress_head"}  # per-request lengths
    for path in repo.glob("*/config.pbtxt"):  # advice only, in comments: never a live block
        assert not [line for line in path.read_text().splitlines() if "dynamic_batching" in line and "#" not in line]
    assert "#   dynamic_batching {" in (repo / "encoder" / "config.pbtxt").read_text()
    assert "#   dynamic_batching {" not in (repo / "llm" / "config.pbtxt").read_text()


def test_referenced_files_exist_and_match_the_bundle(repo, tiny_bundle):
    m = M.load_manifest(tiny_bundle)
    for entry in m.stages:
        if entry.name not in skipped_stages(m):
            assert M.sha256(repo / entry.name / "1" / "model.onnx") == entry.sha256
    version = repo / PIPELINE_MODEL / "1"
    for f in ("model.py", "tokenizer.json", "llm_embeddings.npy", "setok_pipeline.json"):
        assert (version / f).is_file(), f
    assert M.sha256(version / "tokenizer.json") == m.files["tokenizer"]["sha256"]
    assert M.sha256(version / "llm_embeddings.npy") == m.files["embeddings"]["sha256"]


def test_pipeline_config(repo):
    cfg = configs(repo)[PIPELINE_MODEL]
    assert cfg["backend"] == "python"
    io = {(t["name"], t["data_type"], tuple(int(d) for d in t["dims"])) for t in cfg["input"] + cfg["output"]}
    assert io == {("IMAGE", "TYPE_UINT8", (-1, -1, 3)), ("QUESTION", "TYPE_STRING", (1,)),
                  ("TEXT", "TYPE_STRING", (1,)), ("NUM_TOKENS", "TYPE_INT64", (1,))}
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


def test_model_py_compiles_and_is_torch_free(repo, tmp_path):
    path = repo / PIPELINE_MODEL / "1" / "model.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "model.pyc"), doraise=True)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "setok", "transformers", "onnxruntime"}, imported
    assert "triton_python_backend_utils" in imported
    text = path.read_text()
    assert "pb_utils.InferenceRequest(" in text and "requested_output_names=" in text


def test_model_py_tensor_names_follow_the_manifest():
    from setok.serve import model_py

    for name in ("PIXEL_VALUES", "PATCH_FEATURES", "ASSIGNMENT", "NUM_TOKENS", "VISION_TOKENS", "EMBEDS", "LOGITS",
                 "INPUTS_EMBEDS", "ATTENTION_MASK", "POSITION_IDS"):
        assert getattr(model_py, name) == getattr(M, name)


@pytest.mark.parametrize("template", ["question {q} {image} answer", "question {q} answer", "{image} q {q}", "{q} {image}"])
def test_model_py_splits_prompts_like_the_manifest(template):
    from setok.serve import model_py

    q = "is the {red} square left of it"  # braces in the question are text, not fields
    assert model_py.split_prompt(template, q=q) == M.split_prompt(template, q=q)


# ---- model.py's pipeline logic against the setok runtime ----------------------------------------
def _load_model_py(repo: Path):
    spec = importlib.util.spec_from_file_location("setok_triton_model", repo / PIPELINE_MODEL / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ort_call(repo: Path, calls: list[str]):
    """Stands in for BLS: runs each stage model's model.onnx from the repository itself."""
    import onnxruntime as ort

    sessions: dict = {}

    def call(model: str, inputs: dict, outputs: list[str]) -> dict:
        calls.append(model)
        if model not in sessions:
            sessions[model] = ort.InferenceSession(str(repo / model / "1" / "model.onnx"),
                                                   providers=["CPUExecutionProvider"])
        return dict(zip(outputs, sessions[model].run(outputs, inputs)))

    return call


def _noise(shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)


def _regions() -> np.ndarray:
    """A few flat regions: fewer tokens than the maximum, so the padding cut is exercised."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = (200, 40, 40)
    img[10:30, 5:20] = (20, 200, 90)
    return img


@pytest.mark.parametrize("make", [lambda: _noise((64, 64, 3)), lambda: _noise((50, 90, 3)), _regions],
                         ids=["noise", "noise-resized", "regions"])
def test_model_py_answers_like_the_runtime(repo, tiny_bundle, make):
    from setok.runtime import Pipeline

    module = _load_model_py(repo)
    calls: list[str] = []
    pipeline = module.load_pipeline(repo / PIPELINE_MODEL / "1", _ort_call(repo, calls))
    image = make()
    text, k = pipeline.answer(image, "what is here", 8)
    reference = Pipeline.open(tiny_bundle)
    assert text == reference.answer(image, "what is here", max_new_tokens=8).text
    assert k == reference.tokenize(image).num_tokens
    assert calls[:4] == ["encoder", "cluster", "merger", "projector"] and set(calls[4:]) == {"llm"}


def test_model_py_rejects_bad_requests(repo):
    module = _load_model_py(repo)
    pipeline = module.load_pipeline(repo / PIPELINE_MODEL / "1", _ort_call(repo, []))
    with pytest.raises(module.RequestError, match="QUESTION"):
        pipeline.answer(np.zeros((64, 64, 3), np.uint8), "   ", 4)
    with pytest.raises(module.RequestError, match="IMAGE"):
        pipeline.answer(np.zeros((64, 64), np.uint8), "what", 4)
    with pytest.raises(module.RequestError, match="context"):
        pipeline.answer(np.zeros((64, 64, 3), np.uint8), "what", 4000)


# ---- export behaviour ---------------------------------------------------------------------------
def test_export_replaces_an_existing_repository(tiny_bundle, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_triton(tiny_bundle, out, device="gpu")
    assert not (out / "stale.txt").exists()
    assert configs(out)["encoder"]["instance_group"][0]["kind"] == "KIND_GPU"
    assert configs(out)[PIPELINE_MODEL]["instance_group"][0]["kind"] == "KIND_CPU"
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temp dirs left behind


def _fake_engines(tiny_bundle: Path, folder: Path) -> Path:
    """An engines directory as `setok build` writes it, with stand-in plan bytes (no GPU needed)."""
    from setok.backends.trt.engines import EngineEntry, EnginesManifest
    from setok.backends.trt.profiles import Limits, stage_profiles

    m = M.load_manifest(tiny_bundle)
    folder.mkdir()
    entries = []
    for stage, plugin in (("encoder", None), ("cluster", {"id": M.CLUSTER_OP.id, "module": "x"})):
        (folder / f"{stage}.plan").write_bytes(b"plan:" + stage.encode())
        s = m.stage(stage)
        entries.append(EngineEntry(stage, f"{stage}.plan", M.sha256(folder / f"{stage}.plan"), s.file, "fp16",
                                   s.inputs, s.outputs, stage_profiles(s.inputs, Limits.from_manifest(m), stage), plugin))
    EnginesManifest("10.8.0", "gpu", (9, 0), "fp16", M.sha256(tiny_bundle / M.MANIFEST), entries).write(folder)
    return folder


def test_engines_directory_serves_plans_on_the_gpu(tiny_bundle, tmp_path):
    pytest.importorskip("setok.backends.trt.engines")
    engines = _fake_engines(tiny_bundle, tmp_path / "engines")
    with pytest.raises(InputError, match="bundle="):
        export_triton(engines, tmp_path / "repo")
    out = export_triton(engines, tmp_path / "repo", bundle=tiny_bundle)
    cfg = configs(out)
    assert cfg["encoder"]["platform"] == "tensorrt_plan" and cfg["encoder"]["instance_group"][0]["kind"] == "KIND_GPU"
    assert (out / "encoder" / "1" / "model.plan").read_bytes() == b"plan:encoder"
    # The plugin engine cannot load in Triton's TensorRT backend: the bundle's ONNX cluster serves.
    assert cfg["cluster"]["platform"] == "onnxruntime_onnx" and (out / "cluster" / "1" / "model.onnx").is_file()
    assert "cluster (TensorRT engine)" in (out / "README.md").read_text()
    assert {t["name"] for t in cfg["encoder"]["input"]} == {"pixel_values"}


def test_bad_arguments_are_refused_with_a_reason(tmp_path):
    with pytest.raises(InputError, match="device"):
        export_triton(tmp_path, tmp_path / "repo", device="tpu")
    with pytest.raises(InputError, match="max_new_tokens"):
        export_triton(tmp_path, tmp_path / "repo", max_new_tokens=0)
    (tmp_path / "engines.json").write_text("{}")
    with pytest.raises(InputError, match="engines directory"):
        export_triton(tmp_path, tmp_path / "repo")


def test_a_malformed_engines_directory_is_refused_naming_the_field(tiny_bundle, tmp_path):
    """The repository writer reads engines.json and the bundle's manifest through the checked
    readers: a wrong field or a foreign bundle is one BundleError, before anything is written."""
    import json

    from setok.errors import BundleError

    engines = _fake_engines(tiny_bundle, tmp_path / "engines")
    good = (engines / "engines.json").read_text()
    d = json.loads(good)
    d["engines"][0]["inputs"][0]["profiles"][0]["max"] = "big"
    (engines / "engines.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"engines.json: engines.encoder.inputs\[0\].profiles\[0\].max: got a string"):
        export_triton(engines, tmp_path / "repo", bundle=tiny_bundle)
    (engines / "engines.json").write_text(good)
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    m = json.loads((other / M.MANIFEST).read_text())
    (other / M.MANIFEST).write_text(json.dumps({**m, "setok_version": "other"}))
    with pytest.raises(BundleError, match="built from another bundle"):
        export_triton(engines, tmp_path / "repo", bundle=other)
    m["stages"][0]["outputs"] = []
    (other / M.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest.json: stages.encoder.outputs: got an empty list"):
        export_triton(other, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
