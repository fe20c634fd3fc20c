"""`setok calibrate`: an fp32 bundle -> an INT8 bundle with explicit Q/DQ per stage.

Weights: int8, symmetric, per output channel. Activations: int8, symmetric too
(ActivationSymmetric=True): TensorRT's explicit quantization only takes zero-point-0 int8 Q/DQ,
and the same graph is meant to run on ORT (CPU) and TensorRT; the TensorRT calibration table is
amax-based (symmetric) as well, so both artifacts describe the same quantizer. Only
MatMul / Gemm / Conv are quantized: LayerNorm, Softmax and residual Adds stay float.
Which stages may be quantized is the stage registry's word (`Stage.quantize`): the cluster stages
(integer-heavy DPC-KNN, exact ties) are copied as they are.

`quantizer="dynamic"` is the CPU form instead: ONNX Runtime dynamic quantization (int8
per-channel weights; activations quantized at run time from each tensor's own range, so no
calibrated ranges and no activation Q/DQ). On this machine it is the INT8 that is faster than
fp32 (the static Q/DQ graph is not, see README); TensorRT cannot parse it, so `setok build`
refuses such a bundle (build from the fp32 one).
"""

from __future__ import annotations

import functools
import logging
import platform
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from setok import manifest as M
from setok.calibration import feeds as D
from setok.calibration import ranges as R
from setok.errors import InputError
from setok.io import atomic_dir
from setok.optional import require

log = logging.getLogger(__name__)

OP_TYPES = ["MatMul", "Gemm", "Conv"]
QUANTIZERS = ("onnxruntime", "modelopt", "dynamic")
MODELOPT_MISSING = ("nvidia-modelopt[onnx] is needed for --quantizer modelopt: pip install 'nvidia-modelopt[onnx]' "
                    "(in its own environment: it pins older onnx/onnxruntime-gpu)")
DYNAMIC_OPS = ["MatMul", "Gemm"]
GATE = (0.99, 0.02)  # auto-exclude target: output cosine >= 0.99, |norm ratio - 1| <= 0.02
MAX_EXCLUDE_FRAC = 0.25
SPEED_MARGIN = 0.95  # INT8 must take at most 95% of the fp32 time to be kept
# Outputs of the quantized ops stay float: otherwise ORT puts Q/DQ on every MatMul output, so the
# bias Adds, Softmax and residual Adds would read dequantized tensors (TensorRT's placement rules
# quantize GEMM/conv inputs only). Dedicated pairs keep a float tensor float for its other readers.
# Biases stay float (QuantizeBias=False): TensorRT's DequantizeLinear takes int8/fp8 inputs, not
# the int32 biases ORT makes by default (`setok lint` flags them).
QDQ_OPTIONS = {"WeightSymmetric": True, "ActivationSymmetric": True,
               "OpTypesToExcludeOutputQuantization": OP_TYPES, "DedicatedQDQPair": True, "QuantizeBias": False}


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def weight_reduce_range() -> bool:
    """Quantize weights to 7 bits on CPUs where ONNX Runtime's 8-bit ones saturate.

    Without VNNI, ORT's x86 int8 GEMMs multiply u8 activations by s8 weights with VPMADDUBSW,
    which adds two products into an int16 and saturates when both are large; with weights in
    [-64, 63] two products always fit (ORT's quantization guide: use reduce_range there).
    Measured on this AVX2 CPU (tiny bundle, held-out inputs): seg_head's INT8 output norm 2.5 %
    low with 8-bit weights, 0.2 % with 7-bit; merger cosine 0.9966 -> 0.99997. TensorRT and
    VNNI CPUs accumulate in int32 and keep the full 8 bits.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True  # an x86 we cannot inspect: the safe choice
    return not flags & VNNI_FLAGS


def calibrate_bundle(bundle: Path, out: Path, data: str = "synthetic", n: int = 256, method: str = "minmax",
                     stages: list[str] | None = None, quantizer: str = "onnxruntime", auto_exclude: bool = False,
                     seed: int = 0, gate: tuple[float, float] = GATE, speed_gate: bool = True,
                     task_gate: int = 100, task_gates: dict[str, float] | None = None) -> dict:
    """Calibrate and quantize the stages of `bundle`; write the INT8 bundle to `out` atomically.

    Returns a report: per stage the quantized op counts, excluded nodes (and their cosine), the
    int8-vs-fp32 output cosine / norm ratio on held-out inputs, method and n, and fp32 / int8
    latency. With `speed_gate`, a stage whose INT8 graph is not faster than fp32 on this machine
    stays float, and the report and manifest say so (`kept_float`). With `task_gate` > 0 the whole
    INT8 pipeline is evaluated on that many held-out scenes against the fp32 bundle, and INT8
    stages are reverted (upstream first) until the task metrics hold (gate.py).
    """
    from setok.runtime.pipeline import Pipeline

    bundle, out = Path(bundle), Path(out)
    _check_args(n, method, quantizer)
    manifest = M.load_manifest(bundle)
    stages = _check_stages(stages, manifest)
    pipe = Pipeline.open(bundle)
    feeds = D.collect_feeds(pipe, D.load_samples(data, n, pipe.size, seed), stages)
    held = D.collect_feeds(pipe, D.heldout_samples(pipe.size, seed), stages)
    report = {"method": method, "n": n, "data": data, "quantizer": quantizer, "stages": {},
              "weight_bits": 7 if weight_reduce_range() else 8}
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="setok-q-") as work:
        for name in stages:
            entry = manifest.stage(name)
            src = M.inside(bundle, entry.file)
            rep, files = _stage(name, src, tmp, Path(work), feeds[name], held.get(name, feeds[name]),
                                method, quantizer, auto_exclude, gate, entry.kv_cache)
            rep.update(method=method, n=n)
            report["stages"][name] = rep
            int8_path = tmp / f"{name}.int8.onnx"
            rep["fp32_ms"], rep["int8_ms"] = time_stage(src, int8_path, held.get(name, feeds[name]))
            # A 5% margin: timings on a busy machine flap, and a tie is no reason to lose accuracy.
            if speed_gate and rep["int8_ms"] >= SPEED_MARGIN * rep["fp32_ms"]:
                rep["kept_float"] = f"int8 {rep['int8_ms']:.3f} ms is not 5% faster than fp32 {rep['fp32_ms']:.3f} ms here"
                entry.extra = {**entry.extra, "kept_float": rep["kept_float"]}
                int8_path.unlink()
                log.info("%s stays float: %s", name, rep["kept_float"])
            else:
                _update_entry(entry, int8_path, rep, method, quantizer)
            manifest.files.update({role: {"file": rel, "sha256": M.sha256(tmp / rel)} for role, rel in files.items()})
        _copy_rest(bundle, tmp, manifest, [n for n in stages if "kept_float" not in report["stages"][n]])
        manifest.write(tmp)
        if task_gate > 0:
            from setok.calibration.gate import apply_task_gate

            report["task_gate"] = apply_task_gate(bundle, tmp, manifest, task_gate, task_gates)
    pipe.close()
    report["out"] = str(out)
    log.info("INT8 bundle written to %s", out)
    return report


def time_stage(fp32: Path, int8: Path, feeds: list[dict], repeats: int = 9) -> tuple[float, float]:
    """Median ms per feed of the fp32 and int8 graphs, runs interleaved so load hits both alike."""
    import time

    a, b = _session(fp32), _session(int8)
    feeds = feeds[:8]
    for sess in (a, b):  # warm-up: the first runs allocate arenas and pick kernels
        for feed in feeds:
            sess.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for which, sess in enumerate((a, b)):
            start = time.perf_counter()
            for feed in feeds:
                sess.run(None, feed)
            times[which].append((time.perf_counter() - start) * 1000 / max(len(feeds), 1))
    return float(np.median(times[0])), float(np.median(times[1]))


def _check_args(n, method: str, quantizer: str) -> None:
    if not isinstance(n, int) or n < D.MIN_IMAGES:
        raise InputError(f"calibration needs at least {D.MIN_IMAGES} images; got n={n!r}")
    if method not in R.METHODS:
        raise InputError(f"calibration method {method!r}; expected one of {sorted(R.METHODS)}")
    if quantizer not in QUANTIZERS:
        raise InputError(f"quantizer {quantizer!r}; expected one of {list(QUANTIZERS)}")


def _check_stages(stages: list[str] | None, manifest: M.Manifest) -> list[str]:
    """The bundle's stages the registry lets `setok calibrate` quantize (all, or those asked)."""
    from setok.export.stages import STAGES

    valid = [s.name for s in manifest.stages if s.name in STAGES and STAGES[s.name].quantize]
    if stages is None:
        return valid
    bad = [s for s in stages if s not in valid]
    if bad:
        whys = sorted({STAGES[s].float_reason for s in bad if s in STAGES and STAGES[s].float_reason})
        why = f" ({'; '.join(whys)})" if whys else ""
        raise InputError(f"cannot quantize stage(s) {bad}{why}; valid stages: {valid}")
    return [s for s in valid if s in stages]  # pipeline order, no duplicates


def _stage(name, src, root, work, feeds, held, method, quantizer, auto_exclude, gate, kv: M.KvCache) -> tuple[dict, dict]:
    model, note = prepare(src, work / f"{name}.pre.onnx", feeds, kv)
    if quantizer == "dynamic":
        return _stage_dynamic(name, model, root, held, note)
    ranges, unranged = R.stage_ranges(model, feeds, method, OP_TYPES)
    files = R.write_range_files(root, name, ranges)
    cache = R.save_cache(ranges, method, work / f"{name}.ranges.cache.json")
    dst = root / f"{name}.int8.onnx"
    excluded: list[dict] = []
    quantize_model(model, dst, cache, method, quantizer, feeds, [])
    if auto_exclude:
        excluded = exclude_sensitive(model, dst, cache, method, quantizer, feeds, gate)
    cos, ratio = output_agreement(model, dst, held)
    rep = {"quantized_ops": quantized_ops(dst), "excluded": excluded, "cosine": cos, "norm_ratio": ratio,
           "preprocessed": note is None, "unranged": unranged, **({"preprocess_skipped": note} if note else {})}
    log.info("%s: %s, cosine %.5f, norm ratio %.4f, excluded %d", name, rep["quantized_ops"], cos, ratio, len(excluded))
    return rep, files


def _stage_dynamic(name: str, model: Path, root: Path, held: list[dict], note: str | None) -> tuple[dict, dict]:
    """Dynamic quantization: weights now, activations per run; nothing to calibrate or exclude."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = root / f"{name}.int8.onnx"
    quantize_dynamic(str(model), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=True,
                     reduce_range=weight_reduce_range(), weight_type=QuantType.QInt8)
    cos, ratio = output_agreement(model, dst, held)
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    rep = {"quantized_ops": {k: ops[k] for k in ("MatMulInteger", "DynamicQuantizeMatMul") if ops[k]},
           "excluded": [], "cosine": cos, "norm_ratio": ratio, "preprocessed": note is None, "unranged": [],
           "activation_ranges": "per run (dynamic)", **({"preprocess_skipped": note} if note else {})}
    log.info("%s: dynamic %s, cosine %.5f, norm ratio %.4f", name, rep["quantized_ops"], cos, ratio)
    return rep, {}


def prepare(src: Path, dst: Path, feeds: list[dict], kv: M.KvCache | None = None) -> tuple[Path, str | None]:
    """quant_pre_process (shape inference + basic folding), kept only if outputs stay identical.

    Checked on real feeds (and for a model with a KV past, on one decode step with a non-empty
    past) so a dynamic-shape graph the pre-processor mishandles falls back to the fp32 file.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception as e:  # noqa: BLE001 -- the pre-processor's failures are many and untyped; fall back to fp32
        return Path(src), f"quant_pre_process failed: {e}"
    domains = {n.domain for n in onnx.load(str(dst)).graph.node} - {"", "ai.onnx"}
    if domains:
        return Path(src), f"quant_pre_process introduced non-standard ops {sorted(domains)}"
    a, b = _session(src), _session(dst)
    for feed in _check_feeds(a, feeds[:2], kv):
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-4, atol=1e-5):
                return Path(src), "quant_pre_process changed the stage's outputs"
    return dst, None


def _check_feeds(sess, feeds: list[dict], kv: M.KvCache | None) -> list[dict]:
    """The given feeds, plus one decode step with a non-empty past for a KV-cache model."""
    if kv is None or not kv.past or not feeds:
        return feeds
    first = feeds[0]
    names = [o.name for o in sess.get_outputs()]
    past = kv.as_past(dict(zip(names, sess.run(None, first))))
    length = first[M.INPUTS_EMBEDS].shape[1]
    step = {M.INPUTS_EMBEDS: first[M.INPUTS_EMBEDS][:, -1:], M.ATTENTION_MASK: np.ones((1, length + 1), np.int64),
            M.POSITION_IDS: np.array([[length]], np.int64), **past}
    return feeds + [step]


def quantize_model(model: Path, dst: Path, cache: Path, method: str, quantizer: str, feeds: list[dict],
                   exclude: list[str]) -> Path:
    if quantizer == "modelopt":
        return _quantize_modelopt(model, dst, feeds, method, exclude)
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # The ranges come from our cache (ranges.py explains why not from quantize_static's own
    # calibration), so no data reader is needed here.
    quantize_static(str(model), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                    per_channel=True, reduce_range=weight_reduce_range(), activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude), calibrate_method=R.METHODS[method], calibration_cache_path=cache,
                    extra_options=QDQ_OPTIONS)
    return dst


def _quantize_modelopt(model: Path, dst: Path, feeds: list[dict], method: str, exclude: list[str]) -> Path:
    """NVIDIA ModelOpt's ONNX PTQ (API as documented for modelopt.onnx.quantization.quantize)."""
    quantize = require("modelopt.onnx.quantization", MODELOPT_MISSING).quantize
    methods = {"minmax": "max", "entropy": "entropy"}
    if method not in methods:
        raise InputError(f"--quantizer modelopt supports methods {sorted(methods)}; got {method!r}")
    quantize(onnx_path=str(model), quantize_mode="int8", calibration_data=_stacked(feeds),
             calibration_method=methods[method], op_types_to_quantize=OP_TYPES, nodes_to_exclude=list(exclude) or None,
             output_path=str(dst))
    return dst


def _stacked(feeds: list[dict]) -> dict[str, np.ndarray]:
    """ModelOpt takes one array per input, batched on axis 0: use the largest group of equal shapes."""
    groups = Counter(tuple((k, v.shape[1:]) for k, v in sorted(f.items())) for f in feeds)
    key = groups.most_common(1)[0][0]
    same = [f for f in feeds if tuple((k, v.shape[1:]) for k, v in sorted(f.items())) == key]
    if len(same) < len(feeds):
        log.warning("modelopt calibration: %d of %d feeds share one shape and are used", len(same), len(feeds))
    return {k: np.concatenate([f[k] for f in same]) for k in same[0]}


def _session(path: Path, outputs: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if outputs:  # expose intermediate tensors as graph outputs (for per-node errors)
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in outputs if t not in have)
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(cosine, norm ratio) of two runs of one tensor, over all feeds at once."""
    a = np.concatenate([x.ravel() for x in ref]).astype(np.float64)
    b = np.concatenate([x.ravel() for x in got]).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1.0, 1.0) if na == nb else (0.0, float(nb / na) if na else float("inf"))
    return float(a @ b / (na * nb)), float(nb / na)


def _collect(sess, names: list[str], feeds: list[dict]) -> dict[str, list[np.ndarray]]:
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed)):
            got[n].append(v)
    return got


def output_agreement(fp32: Path, int8: Path, feeds: list[dict]) -> tuple[float, float]:
    """Worst (cosine, norm ratio) over the float graph outputs; the ratio reported is the worst |r-1|."""
    a, b = _session(fp32), _session(int8)
    names = [o.name for o in a.get_outputs() if o.type == "tensor(float)"]
    ref, got = _collect(a, names, feeds), _collect(b, names, feeds)
    pairs = [_agreement(ref[n], got[n]) for n in names]
    return min(c for c, _ in pairs), max((r for _, r in pairs), key=lambda r: abs(r - 1))


def _passes(cos: float, ratio: float, gate: tuple[float, float]) -> bool:
    return cos >= gate[0] and abs(ratio - 1) <= gate[1]


def exclude_sensitive(model: Path, dst: Path, cache: Path, method: str, quantizer: str, feeds: list[dict],
                      gate: tuple[float, float]) -> list[dict]:
    """Exclude the quantized nodes whose own output drifts most, one at a time, until the gate holds.

    Cheaper than per-node re-quantization: one fp32 and one int8 run with every quantized node's
    output exposed ranks the nodes; each step re-quantizes once. Capped at 25% of the nodes.
    """
    nodes = _quantized_nodes(dst)
    ranked = _rank_nodes(model, dst, list(nodes), feeds)
    cap = max(1, int(len(nodes) * MAX_EXCLUDE_FRAC))
    excluded: list[dict] = []
    while ranked and len(excluded) < cap and not _passes(*output_agreement(model, dst, feeds), gate):
        node, cos = ranked.pop(0)
        excluded.append({"node": node, "cosine": cos})
        quantize_model(model, dst, cache, method, quantizer, feeds, [e["node"] for e in excluded])
        log.info("auto-exclude: %s (its output cosine %.5f)", node, cos)
    return excluded


def _quantized_nodes(path: Path) -> dict[str, str]:
    """node name -> its output tensor, for MatMul/Gemm/Conv nodes fed by a DequantizeLinear."""
    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.output[0] for n in g.node if n.op_type in OP_TYPES and any(i in dq_out for i in n.input)}


def _node_outputs(path: Path, names: list[str]) -> dict[str, str]:
    # By node name: the quantizer keeps names but renames a quantized output (X -> X_QuantizeLinear_Input).
    return {n.name: n.output[0] for n in onnx.load(str(path)).graph.node if n.name in names}


def _rank_nodes(fp32: Path, int8: Path, names: list[str], feeds: list[dict]) -> list[tuple[str, float]]:
    """Quantized nodes, worst output cosine (int8 graph vs fp32 graph) first."""
    a, b = _node_outputs(fp32, names), _node_outputs(int8, names)
    names = [n for n in names if n in a and n in b]
    ref = _collect(_session(fp32, [a[n] for n in names]), [a[n] for n in names], feeds)
    got = _collect(_session(int8, [b[n] for n in names]), [b[n] for n in names], feeds)
    scores = [(n, _agreement(ref[a[n]], got[b[n]])[0]) for n in names]
    return sorted(scores, key=lambda s: s[1])


def quantized_ops(path: Path) -> dict[str, int]:
    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return dict(Counter(n.op_type for n in g.node if n.op_type in OP_TYPES and any(i in dq_out for i in n.input)))


def _update_entry(entry: M.StageEntry, path: Path, rep: dict, method: str, quantizer: str) -> None:
    entry.file, entry.sha256, entry.precision, entry.data = path.name, M.sha256(path), "int8", M.data_records(path)
    entry.opset = max((o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")),
                      default=entry.opset)
    entry.extra = {**entry.extra, "excluded": rep["excluded"], "method": method, "quantizer": quantizer,
                   "n": rep.get("n"), "weight_bits": 7 if weight_reduce_range() else 8}


def _copy_rest(bundle: Path, tmp: Path, manifest: M.Manifest, quantized: list[str]) -> None:
    """Copy every file the new manifest names that is not written here (float stages, embeddings...)."""
    rels = [f for s in manifest.stages if s.name not in quantized for f in (s.file, *(d["file"] for d in s.data))]
    rels += [f["file"] for f in manifest.files.values()]
    for rel in rels:
        dst = tmp / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(M.inside(bundle, rel), dst)
