"""Weight-only quantization of the decoder: `setok calibrate --llm-weights int4|int8`.

At real sizes decode reads every weight once per token, so it is bound by memory bandwidth and the
weight bytes are the cost. Each MatMul with a constant 2-D weight `W (K, N)` gets symmetric
block-wise integer weights (a block is `block_size` consecutive rows of one column, one float scale
per block; no zero points: TensorRT's DequantizeLinear takes none); activations stay float. The
form follows the target that will run the stage:

- `onnxruntime-cpu`: `com.microsoft.MatMulNBits` (ONNX Runtime's own weight-only op; `accuracy_level`
  4 lets its CPU kernels compute in int8 over the dequantized blocks, the fast path);
- `tensorrt`: `DequantizeLinear(W_q int4|int8, scale, axis=0, block_size) -> MatMul`, opset 21, the
  form TensorRT 10+ parses as weight-only quantization (ONNX Runtime runs it too: its graph optimizer
  fuses the pair into MatMulNBits on CPU). int8 is per output channel there (TensorRT's block
  quantization is for int4).

Algorithms: `rtn` (round to nearest, scale = block absmax / 7.5 for int4 (127.5 for int8), all 16
levels used, error <= scale/2); `gptq` (GPTQ, Frantar et al. 2022: rows quantized in order, each
row's rounding error pushed onto the rows not yet quantized through the inverse Hessian of the
layer's real inputs, H = X^T X over calibration tokens; same grid as rtn, so both targets take it;
the inputs are the fp32 model's, not re-run through the already quantized layers); `awq` (NVIDIA
ModelOpt's int4 AWQ, its own DQ -> MatMul form; needs `nvidia-modelopt[onnx]`).

The LM head (the MatMul that produces `logits`) stays float unless `quantize_lm_head`: it is the
largest single matrix (151,936 x 896 for Qwen2.5-0.5B) and its error goes straight into the
next-token choice.

Graphs past 2 GB work: the graph is read without its external data, each weight is read alone from
its file, and the output's weights are streamed into its own external-data file, so memory holds
one fp32 weight at a time (GPTQ adds the Hessians of a few layers).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from setok import manifest as M
from setok.errors import InputError
from setok.optional import require

log = logging.getLogger(__name__)

FORMATS = {"int4": 4, "int8": 8}
ALGORITHMS = ("rtn", "gptq", "awq")
TARGETS = ("onnxruntime-cpu", "tensorrt")
NBITS, DQ = "MatMulNBits", "DequantizeLinear+MatMul"
FORMS = {"onnxruntime-cpu": NBITS, "tensorrt": DQ}
MS_DOMAIN = "com.microsoft"
DQ_OPSET = 21  # DequantizeLinear's block_size and the INT4 type
QUANTIZED_OPS = {"DequantizeLinear", "QuantizeLinear", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"}
MODELOPT_MISSING = ("--algorithm awq uses NVIDIA ModelOpt's int4 AWQ: pip install 'nvidia-modelopt[onnx]' "
                    "(in its own environment: it pins older onnx/onnxruntime-gpu); or use --algorithm rtn|gptq")
EXTERNAL_MIN_BYTES = 1024  # tensors at least this large go to the external-data file (when there is one)
ALIGN = 65536  # offsets of large tensors in that file: ORT can map them in place
LARGE_GRAPH = 1_500_000_000  # above this an output graph keeps its weights outside the protobuf (2 GB cap)
HESSIAN_BUDGET = 512 << 20  # bytes of GPTQ Hessians accumulated per pass over the calibration feeds


@dataclass(frozen=True)
class WeightSpec:
    """What `--llm-weights` asks for; `check()` says what is wrong with it in one line."""

    format: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    algorithm: str = "rtn"
    quantize_lm_head: bool = False
    target: str = "onnxruntime-cpu"

    @property
    def bits(self) -> int:
        return FORMATS[self.format]

    @property
    def form(self) -> str:
        return FORMS[self.target]

    @property
    def per_channel(self) -> bool:
        """int8 for TensorRT: one scale per output channel (its block quantization is int4-only)."""
        return self.form == DQ and self.bits == 8

    def check(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"--llm-weights {self.format!r}; expected one of {sorted(FORMATS)}")
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"--algorithm {self.algorithm!r}; expected one of {list(ALGORITHMS)}")
        if self.target not in TARGETS:
            raise InputError(f"--target {self.target!r}; expected one of {list(TARGETS)}")
        b = self.block_size
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise InputError(f"--block-size {b!r}; expected a power of two >= 16 (MatMulNBits and TensorRT blocks)")
        if self.accuracy_level not in range(5):
            raise InputError(f"--accuracy-level {self.accuracy_level!r}; expected 0..4 (MatMulNBits: 0 unset, "
                             "1 fp32, 2 fp16, 3 bf16, 4 int8 compute)")
        if self.algorithm == "awq":
            if self.format != "int4":
                raise InputError(f"--algorithm awq writes int4 weights; got --llm-weights {self.format}")
            require("modelopt.onnx.quantization", MODELOPT_MISSING)

    def record(self) -> dict:
        """The manifest entry's `extra` for a weight-only stage (the runtime needs none of it)."""
        return {"weight_format": self.format, "weight_form": NBITS if self.algorithm != "awq" and self.form == NBITS else DQ,
                "block_size": None if self.per_channel else self.block_size,
                "accuracy_level": self.accuracy_level if self.form == NBITS else None,
                "algorithm": self.algorithm, "lm_head": self.format if self.quantize_lm_head else "fp32",
                "target": self.target}


# ---- which MatMuls ------------------------------------------------------------------------------------
def lm_head(graph: onnx.GraphProto, logits: str = M.LOGITS) -> str | None:
    """The MatMul/Gemm that produces `logits` (through at most a few single-input ops), by node name."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(logits)
    for _ in range(6):
        if node is None or node.op_type in ("MatMul", "Gemm"):
            break
        node = producer.get(node.input[0]) if node.input else None
    return node.name if node is not None and node.op_type in ("MatMul", "Gemm") else None


def weight_matmuls(model: onnx.ModelProto, spec: WeightSpec) -> tuple[list[onnx.NodeProto], dict]:
    """(MatMul nodes with a constant 2-D weight that will be quantized, what was skipped and why)."""
    g = model.graph
    fed = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in fed}
    head = lm_head(g)
    picked, skipped = [], defaultdict(int)
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        t = inits.get(n.input[1])
        if t is None:
            skipped["activation x activation"] += 1
        elif len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            skipped["not a 2-D float32 weight"] += 1
        elif n.name == head and not spec.quantize_lm_head:
            skipped["lm head (kept float; --quantize-lm-head)"] += 1
        else:
            picked.append(n)
    return picked, dict(skipped)


def check_stage(model: onnx.ModelProto, name: str, spec: WeightSpec) -> list[onnx.NodeProto]:
    """The nodes to quantize, or an InputError saying why this stage cannot take the format."""
    done = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if done:
        raise InputError(f"stage {name} is already quantized ({', '.join(done)}); --llm-weights needs the fp32 "
                         "graph: calibrate the bundle `setok export` wrote")
    nodes, skipped = weight_matmuls(model, spec)
    if not nodes:
        raise InputError(f"stage {name} has no MatMul with a constant 2-D float32 weight (skipped: {skipped or 'none'}); "
                         f"it cannot take --llm-weights {spec.format}")
    return nodes


# ---- the arithmetic ---------------------------------------------------------------------------------
def qmax(bits: int) -> float:
    """Symmetric scale divisor: absmax / (2^(b-1) - 0.5) maps the block onto all 2^b levels with
    rounding error <= scale / 2 (the extreme rounds to -2^(b-1) or clips to 2^(b-1) - 1)."""
    return 2 ** (bits - 1) - 0.5


def block_scales(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """(K, N) -> (ceil(K / block), N) positive scales; block >= K means one per column."""
    k, n = w.shape
    kb = -(-k // block)
    padded = np.zeros((kb * block, n), np.float32)
    padded[:k] = np.abs(w)
    amax = padded.reshape(kb, block, n).max(axis=1)
    return np.where(amax > 0, amax / qmax(bits), 1.0).astype(np.float32)


def quantize_rows(w: np.ndarray, scales: np.ndarray, block: int, bits: int) -> np.ndarray:
    """Round rows of `w` (rows r0.. of the full K) onto the grid of their blocks' scales -> int8 values."""
    rows = np.arange(w.shape[0])
    s = scales[rows // block]
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.rint(w / s), lo, hi).astype(np.int8)


def rtn(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    scales = block_scales(w, bits, block)
    return quantize_rows(w, scales, block, bits), scales


def gptq(w: np.ndarray, h: np.ndarray, bits: int, block: int, damp: float = 0.01, lazy: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ on y = x @ W, W (K, N), H = sum x^T x (K, K): rows in order, each one's error spread over
    the later rows by the upper Cholesky factor of H^-1. A block's scales come from its rows as they
    stand when the block is reached (already corrected for the earlier blocks' errors)."""
    w = w.astype(np.float64, copy=True)
    k, n = w.shape
    h = h.astype(np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    kb = -(-k // block)
    scales = np.ones((kb, n), np.float32)
    q = np.zeros((k, n), np.int8)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for i0 in range(0, k, lazy):
        i1 = min(i0 + lazy, k)
        err = np.zeros((i1 - i0, n))
        for i in range(i0, i1):
            if i % block == 0:
                b = i // block
                scales[b] = block_scales(w[i:i + block].astype(np.float32), bits, block)[0]
            s = scales[i // block].astype(np.float64)
            qi = np.clip(np.rint(w[i] / s), lo, hi)
            q[i] = qi
            e = (w[i] - qi * s) / u[i, i]
            w[i + 1:i1] -= np.outer(u[i, i + 1:i1], e)
            err[i - i0] = e
        w[i1:] -= u[i0:i1, i1:].T @ err
    return q, scales


# ---- the ONNX forms -------------------------------------------------------------------------------------
def pack_int4(values: np.ndarray) -> bytes:
    """Signed int4 values, flat order, two per byte, the first in the low nibble (ONNX INT4)."""
    flat = values.ravel().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def nbits_nodes(node: onnx.NodeProto, q: np.ndarray, scales: np.ndarray, spec: WeightSpec, stem: str):
    """MatMulNBits: B (N, k_blocks, block * bits / 8) uint8 of q + 2^(bits-1) (its default zero point)."""
    k, n = q.shape
    block, bits = spec.block_size, spec.bits
    kb = scales.shape[0]
    padded = np.zeros((kb * block, n), np.int16)
    padded[:k] = q
    u = (padded + 2 ** (bits - 1)).astype(np.uint8).T.reshape(n, kb, block)  # (N, kb, block)
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    inits = [numpy_helper.from_array(np.ascontiguousarray(b), f"{stem}_Q{bits}"),
             numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(-1), f"{stem}_scales")]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if spec.accuracy_level:
        attrs["accuracy_level"] = spec.accuracy_level
    out = helper.make_node("MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
                           name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, **attrs)
    return [out], inits


def dq_nodes(node: onnx.NodeProto, q: np.ndarray, scales: np.ndarray, spec: WeightSpec, stem: str):
    """DequantizeLinear(int4 blocked on axis 0 | int8 per output channel) -> MatMul, no zero point."""
    k, n = q.shape
    bits = spec.bits
    if bits == 4:
        wq = helper.make_tensor(f"{stem}_DQ_Q4", TensorProto.INT4, [k, n], pack_int4(q), raw=True)
        scale = numpy_helper.from_array(np.ascontiguousarray(scales), f"{stem}_DQ_scales")
        attrs = {"axis": 0, "block_size": spec.block_size}
    else:
        wq = numpy_helper.from_array(np.ascontiguousarray(q), f"{stem}_DQ_Q8")
        scale = numpy_helper.from_array(np.ascontiguousarray(scales.reshape(-1)), f"{stem}_DQ_scales")
        attrs = {"axis": 1}
    deq = helper.make_node("DequantizeLinear", [wq.name, scale.name], [f"{stem}_DQ_output"], name=f"{node.name}_DQ_Q{bits}", **attrs)
    mm = helper.make_node("MatMul", [node.input[0], deq.output[0]], list(node.output), name=f"{node.name}_matmul_Q{bits}")
    return [deq, mm], [wq, scale]


# ---- tensors on disk ---------------------------------------------------------------------------------------
def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for sub in a.graphs:
                yield from _all_tensors(sub)


def read_external(t: onnx.TensorProto, base: Path) -> bytes:
    info = ExternalDataInfo(t)
    path = M.inside(base, info.location)
    with open(path, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def read_tensor(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """One tensor's values, reading only its bytes from the external-data file."""
    if not uses_external_data(t):
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(read_external(t, base), dtype=dtype).reshape(list(t.dims)).copy()


def save_streamed(model: onnx.ModelProto, src_dir: Path, dst: Path, external: bool) -> list[str]:
    """Write `model` to `dst`; with `external`, every tensor >= 1 KiB goes to `<dst>.data`, copied
    from the source's external-data files one tensor at a time. Returns the data files written."""
    data_name = dst.name + ".data"
    tensors = list(_all_tensors(model.graph))
    if not external:
        for t in tensors:
            if uses_external_data(t):
                t.raw_data = read_external(t, src_dir)
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
        onnx.save(model, str(dst))
        return []
    with open(dst.parent / data_name, "wb") as f:
        for t in tensors:
            if uses_external_data(t):
                raw = read_external(t, src_dir)
            elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                raw = t.raw_data
            else:
                continue
            pad = -f.tell() % ALIGN if len(raw) >= ALIGN else 0
            f.write(b"\0" * pad)
            offset = f.tell()
            f.write(raw)
            t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
            t.data_location = TensorProto.EXTERNAL
    onnx.save(model, str(dst))
    return [data_name]


# ---- GPTQ's Hessians ------------------------------------------------------------------------------------------
def hessians(src: Path, inputs: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """H = sum over calibration tokens of x^T x, per MatMul input tensor, from the fp32 graph."""
    import onnxruntime as ort

    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    graph_inputs = {i.name for i in model.graph.input}
    fetch = [t for t in inputs if t not in graph_inputs]
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in fetch if t not in have)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # The graph from memory, its weights from the source folder (nothing is written next to the source).
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        got = dict(zip(fetch, sess.run(fetch, feed))) if fetch else {}
        for name in inputs:
            x = got[name] if name in got else feed[name]
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            out[name] = out.get(name, 0) + x.T @ x
    return out


def _hessian_chunks(nodes: list[onnx.NodeProto], k_of: dict[str, int]) -> list[list[str]]:
    """The distinct MatMul inputs, in graph order, grouped so one group's Hessians fit the budget."""
    chunks, cur, size = [], [], 0
    for name in dict.fromkeys(n.input[0] for n in nodes):
        need = 8 * k_of[name] ** 2
        if cur and size + need > HESSIAN_BUDGET:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += need
    return chunks + ([cur] if cur else [])


# ---- the stage --------------------------------------------------------------------------------------------------
def quantize_stage(src: Path, dst: Path, spec: WeightSpec, name: str, feeds: list[dict], external: bool | None = None) -> dict:
    """Write the weight-only form of the stage graph `src` to `dst`; returns what was done."""
    if spec.algorithm == "awq":
        return _awq(src, dst, spec, feeds)
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    nodes = check_stage(model, name, spec)
    _, skipped = weight_matmuls(model, spec)
    if spec.form == DQ:
        model = _to_opset(model, name)
        nodes = check_stage(model, name, spec)
    inits = {t.name: t for t in model.graph.initializer}
    k_of = {n.input[0]: int(inits[n.input[1]].dims[0]) for n in nodes}
    chunks = _hessian_chunks(nodes, k_of) if spec.algorithm == "gptq" else [list(dict.fromkeys(k_of))]
    replaced: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    block = 1 << 62 if spec.per_channel else spec.block_size
    make = nbits_nodes if spec.form == NBITS else dq_nodes
    for chunk in chunks:
        hs = hessians(src, chunk, feeds) if spec.algorithm == "gptq" else {}
        for node in (n for n in nodes if n.input[0] in chunk):
            w = read_tensor(inits[node.input[1]], src.parent)
            q, scales = gptq(w, hs[node.input[0]], spec.bits, min(block, w.shape[0])) if hs else rtn(w, spec.bits, min(block, w.shape[0]))
            replaced[node.name], made = make(node, q, scales, spec, _stem(node))
            new_inits += made
        log.info("%s: %d/%d MatMuls quantized", name, len(replaced), len(nodes))
    _splice(model, replaced, new_inits)
    if spec.form == NBITS and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if external is None:
        external = bool(M.external_data(src)) or sum(_nbytes(t) for t in model.graph.initializer) > LARGE_GRAPH
    save_streamed(model, src.parent, dst, external)
    return {"quantized_matmuls": len(nodes), "skipped": skipped, **spec.record(),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def _stem(node: onnx.NodeProto) -> str:
    return (node.name or node.output[0]).strip("/").replace("/", "_")


def _nbytes(t: onnx.TensorProto) -> int:
    if uses_external_data(t):
        return int(ExternalDataInfo(t).length or 0)
    return len(t.raw_data) or int(np.prod(t.dims or [1])) * 4


def _to_opset(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Opset 21 for DequantizeLinear's block_size and INT4 (the graph without its weights converts in seconds)."""
    from onnx import version_converter

    have = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if have < DQ_OPSET:
        try:
            model = version_converter.convert_version(model, DQ_OPSET)
        except Exception as e:  # noqa: BLE001 -- the converter's failures are untyped; say what to do instead
            raise InputError(f"stage {name}: cannot convert opset {have} to {DQ_OPSET} for int4 DequantizeLinear ({e}); "
                             f"re-export with `setok export --opset {DQ_OPSET}`") from None
    model.ir_version = max(model.ir_version, 10)
    return model


def _splice(model: onnx.ModelProto, replaced: dict[str, list[onnx.NodeProto]], new_inits: list[onnx.TensorProto]) -> None:
    """Replace nodes in place (topological order holds), drop the float weights nothing reads any more."""
    g = model.graph
    nodes = []
    for n in g.node:
        nodes.extend(replaced.get(n.name, [n]))
    del g.node[:]
    g.node.extend(nodes)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)


def _awq(src: Path, dst: Path, spec: WeightSpec, feeds: list[dict]) -> dict:
    """NVIDIA ModelOpt int4 AWQ (modelopt.onnx.quantization.quantize, quantize_mode='int4')."""
    quantize = require("modelopt.onnx.quantization", MODELOPT_MISSING).quantize
    from setok.calibration.feeds import stack_feeds

    model = onnx.load(str(src), load_external_data=False)
    nodes, skipped = weight_matmuls(model, spec)
    check_stage(model, src.stem, spec)
    exclude = [lm_head(model.graph)] if not spec.quantize_lm_head and lm_head(model.graph) else None
    quantize(onnx_path=str(src), quantize_mode="int4", calibration_method="awq_clip", calibration_data=stack_feeds(feeds),
             nodes_to_exclude=exclude, output_path=str(dst), use_external_data_format=bool(M.external_data(src)))
    return {"quantized_matmuls": len(nodes), "skipped": skipped, **spec.record(),
            "opset": max(o.version for o in onnx.load(str(dst), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))}
