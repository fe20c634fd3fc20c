"""How far a quantized graph's outputs are from its fp32 graph's, over the same feeds: the numbers
every quantization gate reads (cosine and norm ratio per output, and per quantized node for
choosing what to exclude)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

OP_TYPES = ["MatMul", "Gemm", "Conv"]  # what INT8 Q/DQ quantizes


def session(path: Path, outputs: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if outputs:  # expose intermediate tensors as graph outputs (for per-node errors)
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in outputs if t not in have)
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(cosine, norm ratio) of two runs of one tensor, over all feeds at once."""
    a = np.concatenate([x.ravel() for x in ref]).astype(np.float64)
    b = np.concatenate([x.ravel() for x in got]).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1.0, 1.0) if na == nb else (0.0, float(nb / na) if na else float("inf"))
    return float(a @ b / (na * nb)), float(nb / na)


def outputs(sess, feed: dict) -> dict[str, np.ndarray]:
    return dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feed)))


def collect(sess, names: list[str], feeds: list[dict]) -> dict[str, list[np.ndarray]]:
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed)):
            got[n].append(v)
    return got


def output_agreement(fp32: Path, int8: Path, feeds: list[dict]) -> tuple[float, float]:
    """Worst (cosine, norm ratio) over the float graph outputs; the ratio reported is the worst |r-1|."""
    a, b = session(fp32), session(int8)
    names = [o.name for o in a.get_outputs() if o.type == "tensor(float)"]
    ref, got = collect(a, names, feeds), collect(b, names, feeds)
    pairs = [agreement(ref[n], got[n]) for n in names]
    return min(c for c, _ in pairs), max((r for _, r in pairs), key=lambda r: abs(r - 1))


def passes(cos: float, ratio: float, gate: tuple[float, float]) -> bool:
    return cos >= gate[0] and abs(ratio - 1) <= gate[1]


def quantized_nodes(path: Path) -> dict[str, str]:
    """node name -> its output tensor, for MatMul/Gemm/Conv nodes fed by a DequantizeLinear."""
    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.output[0] for n in g.node if n.op_type in OP_TYPES and any(i in dq_out for i in n.input)}


def node_outputs(path: Path, names: list[str]) -> dict[str, str]:
    # By node name: the quantizer keeps names but renames a quantized output (X -> X_QuantizeLinear_Input).
    return {n.name: n.output[0] for n in onnx.load(str(path)).graph.node if n.name in names}


def rank_nodes(fp32: Path, int8: Path, names: list[str], feeds: list[dict]) -> list[tuple[str, float]]:
    """Quantized nodes, worst output cosine (int8 graph vs fp32 graph) first."""
    a, b = node_outputs(fp32, names), node_outputs(int8, names)
    names = [n for n in names if n in a and n in b]
    ref = collect(session(fp32, [a[n] for n in names]), [a[n] for n in names], feeds)
    got = collect(session(int8, [b[n] for n in names]), [b[n] for n in names], feeds)
    scores = [(n, agreement(ref[a[n]], got[b[n]])[0]) for n in names]
    return sorted(scores, key=lambda s: s[1])


def quantized_ops(path: Path) -> dict[str, int]:
    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return dict(Counter(n.op_type for n in g.node if n.op_type in OP_TYPES and any(i in dq_out for i in n.input)))
