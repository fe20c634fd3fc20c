"""TensorRT engines of the tiny bundle vs ONNX Runtime, on a GPU: every stage in fp32 and fp16,
and the cluster plugin exactly equal to the standard-op reference."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

COSINE = 0.999


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'setok[gpu]' on a machine with an NVIDIA GPU, TensorRT >= 10.3; >= 10.9 for the AOT plugin)"
    try:
        from setok.backends.trt.runner import device_info

        device_info()
    except Exception as e:  # noqa: BLE001 - any failure here means: no usable GPU
        return f"no usable CUDA GPU / cuda-python ({type(e).__name__}: {e})"
    return None


_REASON = _skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

from setok import manifest as M
from setok.backends.onnxrt.session import OrtBackend
from setok.backends.trt import build_engines, load_engines_manifest
from setok.backends.trt.runner import open_engines
from setok.errors import InputError


def _images(manifest, n=2) -> np.ndarray:
    from setok.data.items import eval_items
    from setok.runtime.preprocess import normalize

    pre = manifest.preprocessing
    rgb = np.stack([it.image for it in eval_items(n, 5, pre["size"])])
    return normalize(rgb, pre["mean"], pre["std"]).astype(np.float32)


def _stage_feeds(bundle, manifest) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real inputs for every stage: images through the ORT stages; the LLM's prefill and one decode step."""
    ort = {s.name: OrtBackend(M.inside(bundle, s.file), s) for s in manifest.stages if s.name != "cluster_plugin"}
    rng = np.random.default_rng(0)
    px = _images(manifest)
    feats = ort["encoder"].run({M.PIXEL_VALUES: px})[M.PATCH_FEATURES]
    c = ort["cluster"].run({M.PATCH_FEATURES: feats})
    merger = {M.PATCH_FEATURES: feats, M.ASSIGNMENT: c[M.ASSIGNMENT], M.NUM_TOKENS: c[M.NUM_TOKENS]}
    tokens = ort["merger"].run(merger)[M.VISION_TOKENS]
    k = int(c[M.NUM_TOKENS][0])
    llm = manifest.stage("llm")
    hidden = llm.inputs[0].shape[2]
    emb = np.load(M.inside(bundle, manifest.files["embeddings"]["file"]))
    prefill = {"inputs_embeds": emb[rng.integers(0, len(emb), (1, 12))].astype(np.float32),
               "attention_mask": np.ones((1, 12), np.int64), "position_ids": np.arange(12, dtype=np.int64)[None]}
    for spec in llm.inputs[3:]:
        prefill[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
    out = ort["llm"].run(prefill)
    decode = {"inputs_embeds": emb[[[3]]].astype(np.float32), "attention_mask": np.ones((1, 13), np.int64),
              "position_ids": np.array([[12]], np.int64)}
    decode |= {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present.")}
    h = rng.standard_normal((2, k, hidden)).astype(np.float32)
    return {
        "encoder": [{M.PIXEL_VALUES: px}], "cluster": [{M.PATCH_FEATURES: feats}], "merger": [merger],
        "projector": [{M.VISION_TOKENS: tokens[0, :k]}], "llm": [prefill, decode], "regress_head": [{M.HIDDEN: h[0]}],
        "seg_head": [{M.QUERY_HIDDEN: h[:, 0], M.TOKEN_HIDDEN: h}],
        "detokenizer": [{M.VISION_TOKENS: tokens, M.NUM_TOKENS: c[M.NUM_TOKENS]}],
    }


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return M.load_manifest(tiny_bundle)


@pytest.fixture(scope="module")
def feeds(tiny_bundle, manifest):
    return _stage_feeds(tiny_bundle, manifest)


@pytest.fixture(scope="module")
def reference(tiny_bundle, manifest, feeds):
    ort = {s.name: OrtBackend(M.inside(tiny_bundle, s.file), s) for s in manifest.stages if s.name in feeds}
    return {name: [ort[name].run(f) for f in fs] for name, fs in feeds.items()}


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def engines(request, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"engines-{request.param}") / "engines"
    build_engines(tiny_bundle, out, precision=request.param, max_batch=2, cluster_form="standard",
                  timing_cache=tmp_path_factory.getbasetemp() / "timing.cache")
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _compare(stage: str, got: dict, want: dict) -> None:
    assert set(got) == set(want), stage
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (stage, name)
        if np.issubdtype(ref.dtype, np.integer):
            np.testing.assert_array_equal(got[name], ref, err_msg=f"{stage}.{name}")
        elif ref.size:
            assert _cosine(got[name], ref) >= COSINE, (stage, name, _cosine(got[name], ref))


def test_engines_manifest_fits_this_machine(engines, manifest):
    m = load_engines_manifest(engines)
    assert {e.stage for e in m.engines} == {s.name for s in manifest.stages} - {"cluster_plugin"}
    assert m.engine("cluster").precision == "fp32"  # discrete outputs never go to fp16


def test_every_engine_matches_onnxruntime(engines, feeds, reference):
    backends = open_engines(engines)
    try:
        for stage, fs in feeds.items():
            for feed, want in zip(fs, reference[stage]):
                _compare(stage, backends[stage].run(feed), want)
    finally:
        for b in backends.values():
            b.close()


def test_a_batch_over_the_profile_is_refused_by_name(engines, feeds):
    enc = open_engines(engines, ["encoder"])["encoder"]
    px = feeds["encoder"][0][M.PIXEL_VALUES]
    with pytest.raises(InputError, match="pixel_values"):
        enc.run({M.PIXEL_VALUES: np.concatenate([px, px])})  # batch 4 > max_batch 2
    enc.close()


def test_cluster_plugin_equals_the_reference_exactly(tiny_bundle, tmp_path, feeds, reference):
    if importlib.util.find_spec("tensorrt.plugin") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("the cluster plugin needs tensorrt.plugin (TensorRT >= 10.9) and triton")
    out = build_engines(tiny_bundle, tmp_path / "engines", cluster_form="plugin", stages=["cluster"])
    assert load_engines_manifest(out).engine("cluster").plugin is not None
    cluster = open_engines(out, ["cluster"])["cluster"]
    try:
        got = cluster.run(feeds["cluster"][0])
        for name, want in reference["cluster"][0].items():
            np.testing.assert_array_equal(got[name], want, err_msg=name)
    finally:
        cluster.close()


def test_pipeline_on_engines_agrees_with_onnxruntime_end_to_end(engines, tiny_bundle, request):
    """Greedy answers and captions through TensorRT (device-resident KV cache) vs ONNX Runtime."""
    from setok.backends.trt.runner import TrtDecoder
    from setok.data.items import eval_items
    from setok.runtime import Pipeline

    trt_pipe, ort_pipe = Pipeline.open(engines, backend="tensorrt"), Pipeline.open(tiny_bundle)
    try:
        assert isinstance(trt_pipe.decoder(), TrtDecoder)
        items = eval_items(4, seed=77)
        agree = total = 0
        for it in items:
            for q, _ in it.qa[:2]:
                agree += trt_pipe.answer(it.image, q).token_ids == ort_pipe.answer(it.image, q).token_ids
                total += 1
        exact = "fp32" in str(engines)
        assert agree == total if exact else agree >= total - 1, f"{agree}/{total} greedy answers agree"
        batched = trt_pipe.answer_batch([it.image for it in items[:2]], [it.qa[0][0] for it in items[:2]])
        assert [b.token_ids for b in batched] == [trt_pipe.answer(it.image, it.qa[0][0]).token_ids for it in items[:2]]
    finally:
        trt_pipe.close()


def test_bench_on_engines(engines, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "bench", str(engines), "--backend", "tensorrt",
                           "--n", "5", "--warmup", "2", "--batch", "2", "--json", str(out)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    target = json.loads(out.read_text())["targets"][0]
    assert target["name"].startswith("tensorrt:") and target["e2e_median_ms"] > 0 and target["batch"]["size"] == 2
