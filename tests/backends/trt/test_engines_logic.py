"""The TensorRT engine logic that needs no TensorRT: profiles, engines.json, compatibility, plans."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trt_engine_fake import RecordingContext, fake_tensorrt

from setok.backends.trt import build as B
from setok.backends.trt.engines import (
    EngineEntry,
    EnginesError,
    EnginesManifest,
    check_compatible,
    load_engines_manifest,
    versions_compatible,
)
from setok.backends.trt.profiles import (
    Limits,
    Profile,
    buffer_plan,
    resolve_dims,
    select_profile,
    stage_profiles,
)
from setok.errors import InputError, MissingDependency
from setok.manifest import TensorSpec, load_manifest, sha256

MAX_BATCH = 3


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_manifest(tiny_bundle)


@pytest.fixture(scope="module")
def limits(manifest):
    return Limits.from_manifest(manifest, MAX_BATCH)


def _sym_range(limits, sym):
    L = limits.max_sequence
    return {"batch": (1, MAX_BATCH), "num_patches": (limits.num_patches, limits.num_patches),
            "tokens": (1, limits.max_tokens), "sequence": (1, L), "past_sequence": (0, L - 1),
            "total_sequence": (1, L)}[sym]


def test_limits_come_from_the_manifest(manifest, limits):
    cfg = manifest.config
    assert limits.max_sequence == cfg["llm"]["max_position_embeddings"]
    assert limits.num_patches == (cfg["encoder"]["image_size"] // cfg["encoder"]["patch_size"]) ** 2
    assert limits.max_tokens == manifest.stage("detokenizer").inputs[0].shape[1]
    with pytest.raises(InputError, match="max_batch=0"):
        Limits(0, 4, 4, 8)


def test_every_stage_gets_profiles_within_the_limits(manifest, limits):
    for stage in manifest.stages:
        profiles = stage_profiles(stage.inputs, limits, stage.name)
        assert len(profiles) == (2 if stage.name == "llm" else 1), stage.name
        for p in profiles:
            assert set(p.shapes) == {s.name for s in stage.inputs}
            for spec in stage.inputs:
                lo, opt, hi = p.shapes[spec.name]
                for d, a, o, b in zip(spec.shape, lo, opt, hi):
                    assert a <= o <= b, (stage.name, spec.name)
                    if isinstance(d, int):
                        assert a == o == b == d  # static dims copied
                    else:
                        rmin, rmax = _sym_range(limits, d)
                        assert rmin <= a and b <= rmax, (stage.name, spec.name, d)
                    if d == "batch":
                        assert (a, o, b) == (1, 1, MAX_BATCH)


def test_llm_profiles_are_consistent_at_min_opt_and_max(manifest, limits):
    llm = manifest.stage("llm")
    past = llm.inputs[3].name
    prefill, decode = stage_profiles(llm.inputs, limits, "llm")
    assert (prefill.name, decode.name) == ("prefill", "decode")
    for p in (prefill, decode):
        for point in range(3):  # TensorRT checks the graph's shape constraints at each point
            seq = p.shapes["inputs_embeds"][point][1]
            total = p.shapes["attention_mask"][point][1]
            assert total == seq + p.shapes[past][point][2]
            assert p.shapes["position_ids"][point][1] == seq
    L = limits.max_sequence
    assert prefill.shapes["inputs_embeds"][2][1] == L and prefill.shapes[past][2][2] == 0
    assert decode.shapes["inputs_embeds"][2][1] == 1 and decode.shapes[past][2][2] == L - 1


def _llm_shapes(llm, batch, seq, past):
    shapes = {"inputs_embeds": (batch, seq, llm.inputs[0].shape[2]), "attention_mask": (batch, past + seq),
              "position_ids": (batch, seq)}
    for spec in llm.inputs[3:]:
        shapes[spec.name] = (batch, spec.shape[1], past, spec.shape[3])
    return shapes


def test_select_profile_picks_prefill_or_decode(manifest, limits):
    llm = manifest.stage("llm")
    profiles = stage_profiles(llm.inputs, limits, "llm")
    assert select_profile(profiles, _llm_shapes(llm, 1, 20, 0), "llm") == 0
    assert select_profile(profiles, _llm_shapes(llm, 2, 1, 40), "llm") == 1
    assert select_profile(profiles, _llm_shapes(llm, 1, 1, 0), "llm") == 0  # both fit: the first
    with pytest.raises(InputError, match="no engine profile") as e:
        select_profile(profiles, _llm_shapes(llm, 1, 4, 10), "llm")  # chunked prefill: neither profile
    assert "'prefill'" in str(e.value) and "'decode'" in str(e.value)


def test_select_profile_names_the_tensor_its_shape_and_range(manifest, limits):
    enc = manifest.stage("encoder")
    profiles = stage_profiles(enc.inputs, limits, "encoder")
    size = manifest.preprocessing["size"]
    assert select_profile(profiles, {"pixel_values": (MAX_BATCH, 3, size, size)}) == 0
    with pytest.raises(InputError) as e:
        select_profile(profiles, {"pixel_values": (MAX_BATCH + 1, 3, size, size)}, "encoder")
    msg = str(e.value)
    assert "stage encoder" in msg and "pixel_values" in msg
    assert f"[{MAX_BATCH + 1}, 3, {size}, {size}]" in msg
    assert f"[1, 3, {size}, {size}]..[{MAX_BATCH}, 3, {size}, {size}]" in msg


def test_buffer_plan_bytes(manifest):
    llm = manifest.stage("llm")
    dims = resolve_dims(llm.inputs, _llm_shapes(llm, 2, 5, 7))
    assert dims == {"batch": 2, "sequence": 5, "total_sequence": 12, "past_sequence": 7}
    plan = buffer_plan(llm.outputs, dims)
    vocab, hidden = llm.outputs[0].shape[2], llm.outputs[1].shape[2]
    assert plan["logits"] == 2 * 5 * vocab * 4 and plan["hidden_states"] == 2 * 5 * hidden * 4
    kv = llm.outputs[2].shape
    assert plan[llm.outputs[2].name] == 2 * kv[1] * 12 * kv[3] * 4
    cluster = manifest.stage("cluster")
    plan = buffer_plan(cluster.outputs, {"batch": 2, "num_patches": 256})
    assert plan == {"assignment": 2 * 256 * 8, "num_tokens": 2 * 8, "centers": 2 * cluster.outputs[2].shape[1] * 8}
    with pytest.raises(InputError, match="num_patches"):
        buffer_plan(cluster.outputs, {"batch": 1})


def test_resolve_dims_refuses_one_symbol_with_two_values(manifest):
    merger = manifest.stage("merger")
    with pytest.raises(InputError, match="num_patches is 255"):
        resolve_dims(merger.inputs, {"patch_features": (1, 256, 32), "assignment": (1, 255), "num_tokens": (1,)})


# ---- engines.json ---------------------------------------------------------------------------
def _engines(tmp_path: Path, manifest, limits, **kw) -> EnginesManifest:
    entries = []
    for stage in manifest.stages[:3]:
        (tmp_path / f"{stage.name}.engine").write_bytes(stage.name.encode() * 10)
        plugin = {"id": "setok::DensityPeakCluster", "module": "setok.plugins.trt_plugin"} if stage.name == "cluster" else None
        entries.append(EngineEntry(stage.name, f"{stage.name}.engine", sha256(tmp_path / f"{stage.name}.engine"),
                                   stage.file, "fp32", stage.inputs, stage.outputs,
                                   stage_profiles(stage.inputs, limits, stage.name), plugin))
    args = {"tensorrt_version": "10.8.0.43", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0),
            "precision": "fp32", "bundle_manifest_sha256": "ab" * 32, "engines": entries, **kw}
    return EnginesManifest(**args)


def test_engines_manifest_round_trip(tmp_path, manifest, limits):
    m = _engines(tmp_path, manifest, limits, version_compatible=True)
    m.write(tmp_path)
    back = load_engines_manifest(tmp_path)
    assert back.to_dict() == m.to_dict()
    assert back.engine("cluster").plugin["module"] == "setok.plugins.trt_plugin"
    assert back.engine("encoder").profiles == m.engine("encoder").profiles
    d = json.loads((tmp_path / "engines.json").read_text())
    enc = d["engines"][0]["inputs"][0]
    assert set(enc) == {"name", "dtype", "shape", "profiles"} and set(enc["profiles"][0]) == {"min", "opt", "max"}
    assert d["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}


def test_engines_manifest_refuses_tampering_and_unknown_schema(tmp_path, manifest, limits):
    _engines(tmp_path, manifest, limits).write(tmp_path)
    (tmp_path / "encoder.engine").write_bytes(b"other")
    with pytest.raises(EnginesError, match="refusing a modified engine"):
        load_engines_manifest(tmp_path)
    (tmp_path / "encoder.engine").unlink()
    with pytest.raises(EnginesError, match="encoder.engine is missing"):
        load_engines_manifest(tmp_path)
    d = json.loads((tmp_path / "engines.json").read_text())
    (tmp_path / "engines.json").write_text(json.dumps({**d, "schema_version": 99}))
    with pytest.raises(EnginesError, match="schema_version 99"):
        load_engines_manifest(tmp_path, verify=False)
    with pytest.raises(EnginesError, match="no engines.json"):
        load_engines_manifest(tmp_path / "nowhere")


def test_check_compatible_messages(tmp_path, manifest, limits):
    m = _engines(tmp_path, manifest, limits)
    check_compatible(m, "10.8.0.43", (9, 0), "NVIDIA H100 80GB HBM3")
    check_compatible(m, "10.8.0.45", (9, 0), "NVIDIA H100 80GB HBM3")  # the 4th field is a build number
    with pytest.raises(EnginesError) as e:
        check_compatible(m, "10.9.0.34", (9, 0), "NVIDIA H100 80GB HBM3")
    assert str(e.value) == ("engines were built with TensorRT 10.8.0.43 for NVIDIA H100 80GB HBM3 (sm_90); this machine "
                            "has TensorRT 10.9.0.34 / sm_90 (NVIDIA H100 80GB HBM3): rebuild with `setok build`")
    with pytest.raises(EnginesError, match=r"\(sm_90\); this machine has TensorRT 10.8.0.43 / sm_87 \(Orin\)"):
        check_compatible(m, "10.8.0.43", (8, 7), "Orin")


def test_check_compatible_same_cc_other_gpu_warns(tmp_path, manifest, limits, caplog):
    m = _engines(tmp_path, manifest, limits)
    check_compatible(m, "10.8.0.43", (9, 0), "NVIDIA H100 PCIe")
    assert "NVIDIA H100 PCIe" in caplog.text


def test_version_compatible_rule(tmp_path, manifest, limits):
    m = _engines(tmp_path, manifest, limits, version_compatible=True)
    check_compatible(m, "10.12.0.36", (9, 0), "NVIDIA H100 80GB HBM3")  # a later 10.x
    check_compatible(m, "11.1.0", (9, 0), "NVIDIA H100 80GB HBM3")  # documented 10 -> 11
    with pytest.raises(EnginesError, match=r"\(version-compatible\)"):
        check_compatible(m, "10.3.0.30", (9, 0), "NVIDIA H100 80GB HBM3")  # never an older runtime
    with pytest.raises(EnginesError):
        check_compatible(m, "10.12.0.36", (8, 9), "NVIDIA L4")  # the GPU still has to match
    assert versions_compatible("8.6.1", "10.0.1", True) and not versions_compatible("8.6.1", "11.0.0", True)
    assert not versions_compatible("8.5.3", "8.6.1", True)  # version compatibility starts at 8.6
    assert not versions_compatible("11.0.0", "12.0.0", True)


# ---- build decisions ------------------------------------------------------------------------
def test_plan_stage_precision_rules(tmp_path):
    cache = tmp_path / "llm.calib.cache"
    assert B.plan_stage("encoder", "fp32", "fp32", 10) == B.StagePlan("fp32", False)
    assert B.plan_stage("encoder", "fp32", "fp16", 10).flags == ("FP16",)
    p = B.plan_stage("encoder", "fp32", "fp16", 11)
    assert p.autocast_fp16 and p.strongly_typed and not p.flags  # TensorRT 11 has no FP16 flag
    p = B.plan_stage("encoder", "int8", "int8", 10)
    assert p.precision == "int8" and p.strongly_typed and not p.flags  # Q/DQ: strongly typed, no flags
    p = B.plan_stage("llm", "fp32", "int8", 10, cache)
    assert (p.precision, p.flags, p.calib_cache, p.strongly_typed) == ("int8", ("INT8",), cache, False)
    assert B.plan_stage("llm", "fp32", "int8", 10).precision == "fp32"  # no table
    assert "TensorRT >= 11" in B.plan_stage("llm", "fp32", "int8", 11, cache).note
    p = B.plan_stage("cluster", "fp32", "fp16", 10, exact=True)
    assert p.precision == "fp32" and p.clear_flags == ("TF32",) and "discrete" in p.note


def test_the_manifest_says_which_stages_are_exact(manifest):
    """build_engines passes entry.exact: integer outputs only (the clustering), nothing by name."""
    assert {s.name for s in manifest.stages if s.exact} == {"cluster", "cluster_plugin"}


def test_cluster_form_choice(manifest):
    assert B.choose_cluster_form("auto", True, True, False) == "plugin"
    assert B.choose_cluster_form("auto", True, False, False) == "standard"
    assert B.choose_cluster_form("auto", True, True, True) == "standard"  # version-compatible
    assert B.choose_cluster_form("standard", True, True, False) == "standard"
    with pytest.raises(InputError, match="no plugin"):
        B.choose_cluster_form("plugin", False, True, False)
    names = [(n, e.name) for n, e in B.engine_stages(manifest, "plugin")]
    assert ("cluster", "cluster_plugin") in names and len({n for n, _ in names}) == len(names)
    assert ("cluster", "cluster") in [(n, e.name) for n, e in B.engine_stages(manifest, "standard")]


def test_calib_cache_path(tmp_path, manifest):
    assert B.calib_cache_path(tmp_path, manifest, "llm") is None
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "llm.calib.cache").write_text("TRT-100300-EntropyCalibration2\n")
    assert B.calib_cache_path(tmp_path, manifest, "llm") == (tmp_path / "calibration" / "llm.calib.cache").resolve()


def test_build_engines_without_tensorrt_says_how_to_install(tiny_bundle, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(InputError, match="precision 'fp8'"):
        B.build_engines(tiny_bundle, tmp_path / "engines", precision="fp8")
    with pytest.raises(MissingDependency) as e:
        B.build_engines(tiny_bundle, tmp_path / "engines")
    assert "pip install 'setok[gpu]'" in str(e.value) and "TensorRT >= 10.3" in str(e.value)
    assert not (tmp_path / "engines").exists()


def test_importing_the_trt_modules_loads_no_tensorrt_or_cuda():
    code = ("import sys, setok.backends.trt.runner, setok.backends.trt, setok.backends.trt.build; "
            "print([m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_profile_to_dict_round_trip():
    p = Profile("default", {"x": ((1, 2), (1, 4), (3, 8))})
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.violation({"x": np.zeros((2, 9)).shape}) is not None and p.violation({"x": (3, 8)}) is None
    assert TensorSpec("x", "float32", ["batch", 2]).to_dict()["shape"] == ["batch", 2]


def test_buffer_plan_matches_onnxruntime_outputs(tiny_bundle, manifest, limits):
    from setok.backends.onnxrt.session import OrtBackend

    size = manifest.preprocessing["size"]
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    feats = OrtBackend(tiny_bundle / "encoder.onnx", manifest.stage("encoder")).run({"pixel_values": px})["patch_features"]
    for name, feed in (("encoder", {"pixel_values": px}), ("cluster", {"patch_features": feats})):
        stage = manifest.stage(name)
        shapes = {k: v.shape for k, v in feed.items()}
        assert select_profile(stage_profiles(stage.inputs, limits, name), shapes, name) == 0
        outs = OrtBackend(tiny_bundle / stage.file, stage).run(feed)
        assert buffer_plan(stage.outputs, resolve_dims(stage.inputs, shapes)) == {k: v.nbytes for k, v in outs.items()}


# ---- TrtBackend's plumbing against fake tensorrt / cuda-python modules -----------------------
class _Err(int):
    @property
    def name(self):
        return "cudaSuccess" if self == 0 else "cudaErrorMemoryAllocation"


class _FakeCudart:
    """cuda-python's runtime surface TrtBackend uses; 'device' memory is host memory here."""

    class cudaError_t:
        cudaSuccess = _Err(0)

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.live, self.fail_copy, self.streams = {}, False, set()

    def cudaMalloc(self, n):
        import ctypes

        buf = ctypes.create_string_buffer(n)
        self.live[ctypes.addressof(buf)] = buf
        return _Err(0), ctypes.addressof(buf)

    def cudaFree(self, ptr):
        del self.live[ptr]
        return (_Err(0),)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        import ctypes

        if self.fail_copy:
            return (_Err(2),)
        ctypes.memmove(dst, src, n)
        return (_Err(0),)

    def cudaGetErrorString(self, err):
        return _Err(0), b"out of memory"

    def cudaStreamCreate(self):
        self.streams.add(77)
        return _Err(0), 77

    def cudaStreamSynchronize(self, s):
        return (_Err(0),)

    def cudaStreamDestroy(self, s):
        self.streams.discard(s)
        return (_Err(0),)


class _FakeContext(RecordingContext):
    def get_tensor_shape(self, name):
        return self.shapes["x"] if name == "y" else self.shapes["x"][:1]

    def execute_async_v3(self, stream):  # y = 2x, n = arange(tokens)
        import ctypes

        t, d = self.shapes["x"]
        x = np.ctypeslib.as_array((ctypes.c_float * (t * d)).from_address(self.addr["x"]))
        np.ctypeslib.as_array((ctypes.c_float * (t * d)).from_address(self.addr["y"]))[:] = 2 * x
        np.ctypeslib.as_array((ctypes.c_int64 * t).from_address(self.addr["n"]))[:] = np.arange(t)
        return True


def _fake_trt(io, context=_FakeContext):
    return fake_tensorrt(io, context)


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    import setok.backends.trt.runner as T

    rt = _FakeCudart()
    io = {"x": ("in", "float32"), "y": ("out", "float32"), "n": ("out", "int64")}
    monkeypatch.setattr(T, "tensorrt", lambda: _fake_trt(io))
    monkeypatch.setattr(T, "_LOGGER", None)
    monkeypatch.setattr(T, "cudart", lambda: rt)
    ins, outs = [TensorSpec("x", "float32", ["tokens", 32])], [TensorSpec("y", "float32", ["tokens", 32]),
                                                              TensorSpec("n", "int64", ["tokens"])]
    entry = EngineEntry("toy", "toy.engine", "", "toy.onnx", "fp32", ins, outs,
                        stage_profiles(ins, Limits(1, 4, 8, 16), "toy"))
    (tmp_path / "toy.engine").write_bytes(b"plan")
    return T.TrtBackend(tmp_path / "toy.engine", entry), rt


def test_trt_backend_binds_by_name_and_grows_buffers(fake_backend):
    backend, rt = fake_backend
    for t in (3, 7, 2):
        x = np.arange(t * 32, dtype=np.float32).reshape(t, 32)
        out = backend.run({"x": x})
        np.testing.assert_array_equal(out["y"], 2 * x)
        np.testing.assert_array_equal(out["n"], np.arange(t))
    assert backend.context.profiles == [0]  # selected once, kept while it fits
    assert backend._buffers["y"].nbytes == 7 * 32 * 4  # grown to the largest request, never shrunk
    with pytest.raises(InputError, match=r"input x has shape \[9, 32\]"):
        backend.run({"x": np.zeros((9, 32), np.float32)})
    with pytest.raises(InputError, match="float64"):
        backend.run({"x": np.zeros((2, 32))})
    backend.close()
    assert rt.live == {} and rt.streams == set()


def test_trt_backend_names_the_tensor_of_a_failing_cuda_call(fake_backend):
    from setok.backends.trt.runner import TrtError

    backend, rt = fake_backend
    rt.fail_copy = True
    with pytest.raises(TrtError, match=r"HostToDevice of stage toy tensor x failed: cudaErrorMemoryAllocation \(out of memory\)"):
        backend.run({"x": np.ones((2, 32), np.float32)})
    backend.close()


# ---- TrtDecoder: the device-resident KV cache, with the real llm.onnx standing in for the engine ---
class _OrtAsEngineContext(_FakeContext):
    """An execution context whose 'engine' is the bundle's llm.onnx run by ONNX Runtime on the
    bound addresses: TrtDecoder's binding, ping-pong and last-row copies are exercised for real."""

    entry = session = None  # set by the test

    def get_tensor_shape(self, name):
        from setok.backends.trt.profiles import resolve_dims, resolve_shape

        specs = {s.name: s for s in self.entry.outputs}
        if name not in specs:
            return self.shapes[name]
        return resolve_shape(specs[name], resolve_dims(self.entry.inputs, self.shapes))

    def execute_async_v3(self, stream):
        import ctypes
        import math

        def view(name, dtype, shape):
            n = math.prod(shape) * np.dtype(dtype).itemsize
            return np.frombuffer((ctypes.c_char * max(n, 1)).from_address(self.addr[name]), dtype, math.prod(shape)).reshape(shape)

        feeds = {s.name: view(s.name, s.dtype, self.shapes[s.name]).copy() for s in self.entry.inputs}
        outs = self.session.run(None, feeds)
        for spec, value in zip(self.entry.outputs, outs):
            assert tuple(value.shape) == tuple(self.get_tensor_shape(spec.name)), spec.name
            view(spec.name, spec.dtype, value.shape)[...] = value
        self.executed = getattr(self, "executed", 0) + 1
        return True


@pytest.mark.parametrize("form", ["tiny_bundle", "tiny_newest_bundle"])
def test_trt_decoder_keeps_the_cache_on_the_device_and_matches_onnxruntime(form, request, limits, tmp_path,
                                                                          monkeypatch):
    """Both logits forms: all positions (the last row copied down) and `--llm-logits newest` ((1, 1, V))."""
    import onnxruntime as ort

    import setok.backends.trt.runner as T
    from setok.backends.decode import HostDecoder
    from setok.backends.onnxrt.session import OrtBackend

    tiny_bundle = request.getfixturevalue(form)
    llm = load_manifest(tiny_bundle).stage("llm")
    rt = _FakeCudart()
    copies = []
    real_copy = rt.cudaMemcpyAsync
    rt.cudaMemcpyAsync = lambda dst, src, n, kind, stream: copies.append((kind, n)) or real_copy(dst, src, n, kind, stream)
    _OrtAsEngineContext.entry = llm
    _OrtAsEngineContext.session = ort.InferenceSession(str(tiny_bundle / llm.file), providers=["CPUExecutionProvider"])
    io = {s.name: ("in", s.dtype) for s in llm.inputs} | {s.name: ("out", s.dtype) for s in llm.outputs}
    monkeypatch.setattr(T, "tensorrt", lambda: _fake_trt(io, _OrtAsEngineContext))
    monkeypatch.setattr(T, "_LOGGER", None)
    monkeypatch.setattr(T, "cudart", lambda: rt)
    entry = EngineEntry("llm", "llm.engine", "", llm.file, "fp32", llm.inputs, llm.outputs,
                        stage_profiles(llm.inputs, limits, "llm"))
    (tmp_path / "llm.engine").write_bytes(b"plan")
    backend = T.TrtBackend(tmp_path / "llm.engine", entry)
    dec, host = backend.decoder(), HostDecoder(OrtBackend(tiny_bundle / llm.file, llm), llm)
    assert dec.plan.max_length == limits.max_sequence
    rng = np.random.default_rng(0)
    hidden = llm.inputs[0].shape[2]
    prompt = rng.standard_normal((1, 9, hidden)).astype(np.float32)
    a, b = dec.step(prompt), host.step(prompt)
    for _ in range(5):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
        copies.clear()
        nxt = rng.standard_normal((1, 1, hidden)).astype(np.float32)
        a, b = dec.step(nxt), host.step(nxt)
        # Per decode step: embeds, mask, positions up; one logits row and one hidden row down.
        # The cache (hundreds of KB for real models) never crosses: no copy is cache-sized.
        assert sorted(k for k, _ in copies) == [1, 1, 1, 2, 2]
        assert max(n for _, n in copies) < dec.plan.heads * dec.length * dec.plan.head_dim * 4
    assert dec.length == 9 + 5 and backend.context.profiles == [0, 1]  # prefill, then decode
    with pytest.raises(InputError, match="exceed the engine"):
        dec.step(np.zeros((1, limits.max_sequence, hidden), np.float32))
    dec.close()
    before = len(rt.live)
    reused = backend.decoder()  # the next answer reuses the cache buffers: no new cudaMalloc
    assert reused.sets is not None and not backend._kv_pool and len(rt.live) == before
    reused.close()
    backend.close()
    assert rt.live == {}
