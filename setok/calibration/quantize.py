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

from setok import manifest as M
from setok.backends.decode import teacher_forced_logits
from setok.calibration import feeds as D
from setok.calibration import ranges as R
from setok.calibration import weights as W
from setok.calibration.agreement import (
    OP_TYPES,
    agreement,
    collect,
    output_agreement,
    outputs,
    passes,
    quantized_nodes,
    quantized_ops,
    rank_nodes,
    session,
)
from setok.errors import InputError
from setok.io import atomic_dir
from setok.optional import require

log = logging.getLogger(__name__)

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
                     task_gate: int = 100, task_gates: dict[str, float] | None = None, target: str = "onnxruntime-cpu",
                     llm_weights: W.WeightSpec | None = None) -> dict:
    """Calibrate and quantize the stages of `bundle`; write the quantized bundle to `out` atomically.

    Returns a report: per stage the quantized op counts, excluded nodes (and their cosine), the
    int8-vs-fp32 output cosine / norm ratio on held-out inputs, method and n, and fp32 / int8
    latency. `target` is what will run the bundle:

    - `onnxruntime-cpu`: with `speed_gate`, a stage whose INT8 graph is not faster than fp32 on this
      machine tries the next CPU form (static Q/DQ, then dynamic INT8) and stays float when none is
      faster; the report and manifest say so (`kept_float`);
    - `tensorrt`: a stage keeps its Q/DQ when its accuracy gate (`gate`: output cosine, norm ratio)
      holds; TensorRT's speed cannot be measured on this machine, and the report says so.

    `llm_weights` gives the decoder stage (the one with a KV cache) weight-only int4/int8 weights
    instead (weights.py): MatMulNBits for ONNX Runtime, DequantizeLinear -> MatMul for TensorRT.
    With `task_gate` > 0 the whole quantized pipeline is evaluated on that many held-out scenes
    against the fp32 bundle, and quantized stages are reverted (upstream first) until the task
    metrics hold (gate.py). Every stage asked for records the target in its manifest `extra`.
    """
    from setok.runtime.pipeline import Pipeline

    bundle, out = Path(bundle), Path(out)
    _check_args(n, method, quantizer, target, llm_weights)
    manifest = M.load_manifest(bundle)
    stages = _check_stages(stages, manifest)
    weight_only = [s for s in stages if llm_weights is not None and manifest.stage(s).kv_cache.past]
    if llm_weights is not None and not weight_only:
        raise InputError(f"--llm-weights applies to the decoder stage (the one with a KV cache); the stages asked for, "
                         f"{stages}, have none: add it to --stages")
    pipe = Pipeline.open(bundle)
    # rtn needs no calibration data for the decoder: its feeds are only held out, for the gates.
    calibrated = [s for s in stages if s not in weight_only or llm_weights.algorithm != "rtn"]
    feeds = D.collect_feeds(pipe, D.load_samples(data, n, pipe.size, seed), calibrated)
    held = D.collect_feeds(pipe, D.heldout_samples(pipe.size, seed), stages)
    pipe.close()  # the fp32 sessions are not needed any more (at real size they are GBs)
    report = {"method": method, "n": n, "data": data, "quantizer": quantizer, "target": target, "stages": {},
              "weight_bits": 7 if weight_reduce_range() else 8}
    if target == "tensorrt":
        report["speed"] = TRT_SPEED_NOTE
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="setok-q-") as work:
        for name in stages:
            entry = manifest.stage(name)
            src = M.inside(bundle, entry.file)
            stage_held = held.get(name) or feeds.get(name, [])
            if name in weight_only:
                report["stages"][name] = _weight_only_stage(name, entry, src, tmp, feeds.get(name, []), stage_held,
                                                            llm_weights, speed_gate)
                continue
            rep, files = _stage(name, src, tmp, Path(work), feeds[name], stage_held,
                                method, quantizer, auto_exclude, gate, entry.kv_cache)
            rep.update(method=method, n=n)
            report["stages"][name] = rep
            int8_path = tmp / f"{name}.int8.onnx"
            stage_quantizer = quantizer
            if target == "tensorrt":
                if not passes(rep["cosine"], rep["norm_ratio"], gate):
                    rep["kept_float"] = (f"accuracy gate: cosine {rep['cosine']:.5f}, norm ratio {rep['norm_ratio']:.4f} "
                                         f"(needs >= {gate[0]}, within {gate[1]} of 1)")
            else:
                rep["fp32_ms"], rep["int8_ms"] = time_stage(src, int8_path, stage_held)
                # A 5% margin: timings on a busy machine flap, and a tie is no reason to lose accuracy.
                if speed_gate and rep["int8_ms"] >= SPEED_MARGIN * rep["fp32_ms"] and quantizer == "onnxruntime":
                    stage_quantizer, files = _cpu_candidate(name, src, tmp, Path(work), stage_held, rep, files)
                if speed_gate and rep["int8_ms"] >= SPEED_MARGIN * rep["fp32_ms"]:
                    rep["kept_float"] = f"int8 {rep['int8_ms']:.3f} ms is not 5% faster than fp32 {rep['fp32_ms']:.3f} ms here"
            if "kept_float" in rep:
                entry.extra = {**entry.extra, "kept_float": rep["kept_float"]}
                int8_path.unlink()
                log.info("%s stays float: %s", name, rep["kept_float"])
            else:
                _update_entry(entry, int8_path, rep, method, stage_quantizer)
            manifest.files.update({role: {"file": rel, "sha256": M.sha256(tmp / rel)} for role, rel in files.items()})
        for name in stages:
            entry = manifest.stage(name)
            entry.extra = {**entry.extra, "target": target}
        _copy_rest(bundle, tmp, manifest, [n for n in stages if "kept_float" not in report["stages"][n]])
        manifest.write(tmp)
        if task_gate > 0:
            from setok.calibration.gate import apply_task_gate

            report["task_gate"] = apply_task_gate(bundle, tmp, manifest, task_gate, task_gates)
    report["out"] = str(out)
    log.info("quantized bundle written to %s", out)
    return report


TRT_SPEED_NOTE = ("TensorRT's speed is not measurable on this machine (no GPU): stages keep their Q/DQ where the "
                  "accuracy gates hold, measured with ONNX Runtime CPU running the same graphs")


def _cpu_candidate(name: str, src: Path, tmp: Path, work: Path, held: list[dict], rep: dict,
                   files: dict) -> tuple[str, dict]:
    """The static Q/DQ graph is not faster than fp32 here: try dynamic INT8 (ONNX Runtime's CPU form)
    and keep whichever of the two is faster (the range files stay: TensorRT's implicit INT8 reads them)."""
    pre = work / f"{name}.pre.onnx"
    model = pre if rep.get("preprocessed") and pre.exists() else src
    path = tmp / f"{name}.int8.onnx"
    static = path.rename(tmp / f"{name}.qdq.onnx")
    dyn, _ = _stage_dynamic(name, model, tmp, held, None)  # writes `path`
    _, dyn_ms = time_stage(src, path, held)
    rep["candidates"] = {"qdq_ms": rep["int8_ms"], "dynamic_ms": dyn_ms, "dynamic_cosine": dyn["cosine"]}
    if dyn_ms < rep["int8_ms"] and passes(dyn["cosine"], dyn["norm_ratio"], GATE):
        static.unlink()
        rep.update({k: dyn[k] for k in ("quantized_ops", "cosine", "norm_ratio", "activation_ranges")}, int8_ms=dyn_ms)
        log.info("%s: dynamic INT8 %.3f ms beats the Q/DQ graph", name, dyn_ms)
        return "dynamic", files
    static.replace(path)
    return "onnxruntime", files


# A weight-only decoder is judged by what decoding reads off it: the teacher-forced next token (argmax
# per position of the held-out prompts) and the logits. Its hidden states and KV cache carry the
# larger error of 16-level weights (cosine ~0.98 at Qwen2.5-0.5B's shape with every MatMul int4),
# reported, not gated; the task gate (gate.py) judges the whole pipeline.
WEIGHT_GATE = (0.9, 0.95)  # next-token agreement, logits cosine


def _weight_only_stage(name: str, entry: M.StageEntry, src: Path, tmp: Path, feeds: list[dict], held: list[dict],
                       spec: W.WeightSpec, speed_gate: bool) -> dict:
    """The decoder stage with weight-only int4/int8 weights (weights.py): for ONNX Runtime it must
    decode faster than fp32 here; for both targets its next tokens and logits must agree (WEIGHT_GATE)."""
    dst = tmp / f"{name}.{spec.format}.onnx"
    rep = W.quantize_stage(src, dst, spec, name, feeds)
    timed = speed_gate and spec.target == "onnxruntime-cpu"
    rep.update(compare_decoder(src, dst, held, entry.kv_cache, timed))
    rep["fp32_mb"] = round(_graph_bytes(src) / 2**20, 1)
    rep["quantized_mb"] = round(_graph_bytes(dst) / 2**20, 1)
    why = ""
    agree, cos = WEIGHT_GATE
    if rep["next_token_agreement"] < agree or rep["logits_cosine"] < cos:
        why = (f"accuracy gate: next-token agreement {rep['next_token_agreement']:.3f}, logits cosine "
               f"{rep['logits_cosine']:.5f} (needs >= {agree}, >= {cos})")
    elif timed and rep["decode_ms"] >= SPEED_MARGIN * rep["fp32_decode_ms"]:
        why = f"{spec.format} decode step {rep['decode_ms']:.3f} ms is not 5% faster than fp32 {rep['fp32_decode_ms']:.3f} ms here"
    if why:
        rep["kept_float"] = why
        entry.extra = {**entry.extra, "kept_float": why}
        for path in (dst, *(dst.parent / d for d in M.external_data(dst))):
            path.unlink(missing_ok=True)
        log.info("%s stays float: %s", name, why)
        return rep
    entry.file, entry.sha256, entry.precision, entry.data = dst.name, M.sha256(dst), spec.format, M.data_records(dst)
    entry.opset = rep["opset"]
    entry.extra = {**entry.extra, **spec.record(), "quantized_matmuls": rep["quantized_matmuls"],
                   "n": len(feeds) if spec.algorithm != "rtn" else 0}
    log.info("%s: %s %s (%s), cosine %.5f, next-token agreement %.3f", name, spec.format, rep["weight_form"],
             spec.algorithm, rep["cosine"], rep["next_token_agreement"])
    return rep


def _graph_bytes(path: Path) -> int:
    return path.stat().st_size + sum((path.parent / d).stat().st_size for d in M.external_data(path))


def compare_decoder(fp32: Path, quant: Path, held: list[dict], kv: M.KvCache, timed: bool) -> dict:
    """Outputs of the two decoder graphs on the held-out prefills: worst cosine / norm ratio over the
    float outputs, the logits' own cosine, teacher-forced next-token agreement (argmax per position);
    `timed`: the median ms of one decode step (one token on a non-empty past) of each."""
    import time

    a, b = session(fp32), session(quant)
    names = [o.name for o in a.get_outputs() if o.type == "tensor(float)"]
    ref, got = collect(a, names, held), collect(b, names, held)
    for sess, outs in ((a, ref), (b, got)):  # every position's logits, also from a newest-logits graph
        run = functools.partial(outputs, sess)
        outs[M.LOGITS] = [teacher_forced_logits(run, f, {M.LOGITS: x}) for f, x in zip(held, outs[M.LOGITS])]
    pairs = {n: agreement(ref[n], got[n]) for n in names}
    same = [np.mean(x.argmax(-1) == y.argmax(-1)) for x, y in zip(ref[M.LOGITS], got[M.LOGITS])]
    rep = {"cosine": min(c for c, _ in pairs.values()), "norm_ratio": max((r for _, r in pairs.values()), key=lambda r: abs(r - 1)),
           "logits_cosine": pairs[M.LOGITS][0], "next_token_agreement": float(np.mean(same)),
           "agreement_positions": int(sum(x.shape[1] for x in ref[M.LOGITS]))}
    if timed and held:
        step = _check_feeds(a, held[:1], kv)[-1]
        times: dict[int, list[float]] = {0: [], 1: []}
        for sess in (a, b):
            sess.run(None, step)
        for _ in range(9):
            for which, sess in enumerate((a, b)):
                start = time.perf_counter()
                sess.run(None, step)
                times[which].append((time.perf_counter() - start) * 1000)
        rep["fp32_decode_ms"], rep["decode_ms"] = float(np.median(times[0])), float(np.median(times[1]))
    return rep


def time_stage(fp32: Path, int8: Path, feeds: list[dict], repeats: int = 9) -> tuple[float, float]:
    """Median ms per feed of the fp32 and int8 graphs, runs interleaved so load hits both alike."""
    import time

    a, b = session(fp32), session(int8)
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


def _check_args(n, method: str, quantizer: str, target: str = "onnxruntime-cpu",
                llm_weights: W.WeightSpec | None = None) -> None:
    if not isinstance(n, int) or n < D.MIN_IMAGES:
        raise InputError(f"calibration needs at least {D.MIN_IMAGES} images; got n={n!r}")
    if method not in R.METHODS:
        raise InputError(f"calibration method {method!r}; expected one of {sorted(R.METHODS)}")
    if quantizer not in QUANTIZERS:
        raise InputError(f"quantizer {quantizer!r}; expected one of {list(QUANTIZERS)}")
    if target not in W.TARGETS:
        raise InputError(f"--target {target!r}; expected one of {list(W.TARGETS)}")
    if target == "tensorrt" and quantizer == "dynamic":
        raise InputError("--quantizer dynamic writes ONNX Runtime's CPU INT8 (MatMulInteger), which TensorRT cannot "
                         "parse; with --target tensorrt use --quantizer onnxruntime or modelopt")
    if llm_weights is not None:
        if llm_weights.target != target:
            raise InputError(f"--llm-weights was set up for target {llm_weights.target!r}, the bundle for {target!r}")
        llm_weights.check()


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
    a, b = session(src), session(dst)
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
    quantize(onnx_path=str(model), quantize_mode="int8", calibration_data=D.stack_feeds(feeds),
             calibration_method=methods[method], op_types_to_quantize=OP_TYPES, nodes_to_exclude=list(exclude) or None,
             output_path=str(dst))
    return dst


def exclude_sensitive(model: Path, dst: Path, cache: Path, method: str, quantizer: str, feeds: list[dict],
                      gate: tuple[float, float]) -> list[dict]:
    """Exclude the quantized nodes whose own output drifts most, one at a time, until the gate holds.

    Cheaper than per-node re-quantization: one fp32 and one int8 run with every quantized node's
    output exposed ranks the nodes; each step re-quantizes once. Capped at 25% of the nodes.
    """
    nodes = quantized_nodes(dst)
    ranked = rank_nodes(model, dst, list(nodes), feeds)
    cap = max(1, int(len(nodes) * MAX_EXCLUDE_FRAC))
    excluded: list[dict] = []
    while ranked and len(excluded) < cap and not passes(*output_agreement(model, dst, feeds), gate):
        node, cos = ranked.pop(0)
        excluded.append({"node": node, "cosine": cos})
        quantize_model(model, dst, cache, method, quantizer, feeds, [e["node"] for e in excluded])
        log.info("auto-exclude: %s (its output cosine %.5f)", node, cos)
    return excluded


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
