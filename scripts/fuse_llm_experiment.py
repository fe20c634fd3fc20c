"""Issue #17: how much of the INT4 decode gap to onnxruntime-genai ONNX Runtime's own transformer
fusions recover on setok's llm graph (optimum's TorchScript export), with the graph's I/O unchanged.

Steps (each skipped when its output exists; ``all`` runs them in order):

* ``fuse``: ``onnxruntime.transformers.optimizer.optimize_model(model_type=qwen3, num_heads=14,
  hidden_size=896, opt_level=0)`` on the fp32 llm graph -> ``WORK/fp32_fused/llm.onnx`` (the Python
  fusions only; ONNX Runtime's own level-1/2 graph passes run anyway when a session loads the graph);
* ``quantize``: setok's own weight-only quantizer (``setok.calibration.weights.quantize_stage``: rtn,
  int4, block 32, accuracy_level 4, symmetric, LM head int4, exactly what the baseline bundle used)
  on the fused graph -> ``WORK/int4_fused/llm.onnx``; ``fuse`` is also applied to the int4 graph
  itself -> ``WORK/int4_then_fused/llm.onnx``; ORT's attention fusion (FusionRotaryAttention) matches
  none of the 24 layers (``diagnose`` says where each of its paths breaks), so ``build`` also writes a
  hand-written ``GroupQueryAttention`` form of the fused graphs (``llm_gqa.onnx`` beside each: q/k
  RotaryEmbedding on position_ids, GQA with seqlens_k/total_sequence_length computed in the graph from
  attention_mask, the eager attention, repeat_kv and 4-D mask pruned): what that fusion would buy;
* ``io``: graph inputs/outputs (names, dtypes, dims) of every variant against its source;
* ``numerics``: fp32 fused vs fp32, and each int4 variant vs the int4 baseline: logits cosine and
  max |diff| for a 7-token prefill and one decode step (real embedding rows of random token ids);
* ``diagnose``: each FusionRotaryAttention path on layer 0: matched, or the first op that differs;
* ``bench``: one session per variant (2 intra-op threads, sequential), a 40-token prefill, then 32
  decode steps feeding each step's presents back; variants run round-robin (A, B, C, A, B, C, ...)
  and the result is the median over rounds of each round's median ms/token, plus the load average;
  ``--reference`` adds onnxruntime-genai's builder model.onnx (fed input_ids) to the same rounds, run by
  plain ONNX Runtime like the others (the graph's cost without genai's runtime); ``--no-spin`` makes
  idle intra-op threads sleep (results under ``bench_no_spin``; steadier when the machine is shared).

Reproduce (the bundle's fp32 llm, the int4+head llm that ``setok calibrate --llm-weights int4
--quantize-lm-head`` wrote)::

    python scripts/fuse_llm_experiment.py all \
        --fp32 runs/real/siglip-qwen2.5-0.5b/bundle/llm.onnx \
        --int4 /tmp/bench17/int4h/llm.int4.onnx \
        --embeddings runs/real/siglip-qwen2.5-0.5b/bundle/llm_embeddings.npy \
        --work /tmp/fuse --rounds 7 --reference /tmp/peers/genai-int4/model.onnx --out /tmp/fuse/results.json
    # re-time only (the graphs exist):
    python scripts/fuse_llm_experiment.py bench --work /tmp/fuse --int4 /tmp/bench17/int4h/llm.int4.onnx --rounds 7 \
        --embeddings runs/real/siglip-qwen2.5-0.5b/bundle/llm_embeddings.npy --reference /tmp/peers/genai-int4/model.onnx
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from setok.export.attention import (
    prune,  # the shipped form's (setok export --llm-attention gqa)
)

log = logging.getLogger("fuse_llm")

NUM_HEADS, HIDDEN = 14, 896
FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
             "MultiHeadAttention", "GroupQueryAttention", "Attention", "MatMulNBits")


# ---- graphs ----------------------------------------------------------------------------------------
def variants(work: Path, int4: Path) -> dict[str, Path]:
    return {"int4_baseline": int4, "int4_fused": work / "int4_fused" / "llm.onnx",
            "int4_then_fused": work / "int4_then_fused" / "llm.onnx",
            "int4_fused_gqa": work / "int4_fused" / "llm_gqa.onnx"}


def op_counts(path: Path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return {"nodes": len(m.graph.node), "non_constant_nodes": len(m.graph.node) - c["Constant"],
            **{k: c[k] for k in FUSED_OPS}}


def session_op_counts(path: Path, tmp: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its own level-ALL passes at load)."""
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(tmp / "session_optimized.onnx")
    o.add_session_config_entry("session.optimized_model_external_initializers_file_name", "session_optimized.onnx.data")
    o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    counts = op_counts(tmp / "session_optimized.onnx")
    for f in ("session_optimized.onnx", "session_optimized.onnx.data"):
        (tmp / f).unlink(missing_ok=True)
    return counts


def fuse(src: Path, dst: Path, model_type: str) -> dict:
    """ORT's Python transformer fusions (opt_level 0); returns the optimizer's fusion statistics."""
    from onnxruntime.transformers.optimizer import optimize_model

    dst.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    m = optimize_model(str(src), model_type=model_type, num_heads=NUM_HEADS, hidden_size=HIDDEN,
                       opt_level=0, use_gpu=False)
    stats = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    m.save_model_to_file(str(dst), use_external_data_format=True)
    log.info("fused %s -> %s in %.0f s: %s", src, dst, time.perf_counter() - t, stats)
    return stats


def quantize(src: Path, dst: Path) -> dict:
    """setok's int4 rtn quantizer with the baseline's settings (block 32, accuracy_level 4, LM head int4)."""
    from setok.calibration.weights import WeightSpec, quantize_stage

    dst.parent.mkdir(parents=True, exist_ok=True)
    spec = WeightSpec(format="int4", block_size=32, accuracy_level=4, algorithm="rtn", quantize_lm_head=True)
    return quantize_stage(src, dst, spec, "llm", feeds=[], external=True)


def io_signature(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)

    def sig(vs):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vs]
    return {"inputs": sig(m.graph.input), "outputs": sig(m.graph.output)}


def io_same(a: Path, b: Path) -> bool:
    sa, sb = io_signature(a), io_signature(b)
    if sa != sb:
        for k in ("inputs", "outputs"):
            diff = [(x, y) for x, y in zip(sa[k], sb[k]) if x != y] + [len(sa[k]), len(sb[k])]
            log.warning("%s vs %s %s differ: %s", a, b, k, diff[:4])
    return sa == sb


# ---- why attention does not fuse --------------------------------------------------------------------
# The paths FusionRotaryAttention (onnxruntime/transformers/fusion_rotary_attention.py) walks from the
# SkipSimplifiedLayerNormalization after a layer's attention, in its order; for the repeat_kv (GQA) layout
# the v and k candidates are its "LLaMA-2 70B" ones (v_nodes_4[0], k_nodes_4[0]), the only ones with Expand.
ORT_PATHS = [
    ("qkv (qkv_nodes_2)", "norm", ["MatMul", "Reshape", "Transpose", "MatMul"], [1, 0, 0, 0]),
    ("v (v_nodes_4[0], repeat_kv)", "matmul_qkv",
     ["Reshape", "Expand", "Unsqueeze", "Concat", "Transpose", "Reshape", "MatMul"], [1, 0, 0, 0, 1, 0, 0]),
    ("v (v_nodes_5, bias Add, no repeat_kv)", "matmul_qkv", ["Concat", "Transpose", "Reshape", "Add", "MatMul"], [1, 1, 0, 0, 1]),
    ("qk", "matmul_qkv", ["Softmax", "Add", "Div", "MatMul"], [0, 0, 0, 0]),
    ("attention mask (attn_mask_nodes_4, HF 2-D mask)", "add_qk",
     ["Where", "Sub", "Cast", "Expand", "Unsqueeze", "Unsqueeze"], [1, 2, 1, 0, 0, 0]),
    ("k (k_nodes_4[0], repeat_kv)", "matmul_qk",
     ["Transpose", "Reshape", "Expand", "Unsqueeze", "Concat", "RotaryEmbedding", "Transpose", "Reshape", "MatMul"],
     [1, 0, 0, 0, 0, 1, 0, 0, 0]),
    ("q (q_nodes_2)", "matmul_qk", ["RotaryEmbedding", "Transpose", "Reshape", "MatMul"], [0, 0, 0, 0]),
]


def walk(producer: dict, node: onnx.NodeProto, ops: list[str], idx: list[int]) -> tuple[list, str | None]:
    """Follow `idx` up from `node`; (nodes matched, None) or (nodes so far, 'expected X, found Y')."""
    got = []
    for op, i in zip(ops, idx):
        parent = producer.get(node.input[i]) if i < len(node.input) else None
        found = parent.op_type if parent is not None else f"graph input/initializer {node.input[i]!r}"
        if parent is None or parent.op_type != op:
            return got, f"step {len(got) + 1}: expected {op} at input {i} of {node.op_type} {node.name}, found {found}"
        got.append(parent)
        node = parent
    return got, None


def diagnose(path: Path, layer: int = 0) -> list[dict]:
    """Each FusionRotaryAttention path on one layer of the (already norm/rotary fused) fp32 graph."""
    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    o_proj = next(n for n in g.node if n.name == f"/llm/model/layers.{layer}/self_attn/o_proj/MatMul")
    at = {"norm": consumers[o_proj.output[0]][0]}
    at["matmul_qkv"] = walk(producer, at["norm"], *ORT_PATHS[0][2:])[0][-1]
    softmax = producer[at["matmul_qkv"].input[0]]
    at["add_qk"] = producer[softmax.input[0]]
    at["matmul_qk"] = producer[producer[at["add_qk"].input[0]].input[0]]  # through our Mul (scale)
    out = []
    for what, start, ops, idx in ORT_PATHS:
        got, why = walk(producer, at[start], ops, idx)
        out.append({"path": what, "from": at[start].name, "expected": ops, "matched": why is None, "why": why,
                    "ours": [n.op_type for n in got] + ([why.split("found ")[-1]] if why else [])})
        log.info("%s: %s", what, "matches" if why is None else why)
    return out


# ---- hand-written GroupQueryAttention (not ORT's optimizer: what the attention fusion would buy) -------
def _const(name: str, value) -> onnx.NodeProto:
    return onnx.helper.make_node("Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(np.asarray(value), name))


def gqa_mask_nodes() -> list[onnx.NodeProto]:
    """seqlens_k = sum(attention_mask, 1) - 1 and total_sequence_length = attention_mask.shape[1], int32 (as genai)."""
    mk = onnx.helper.make_node
    return [_const("gqa/axes1", np.array([1], np.int64)), _const("gqa/one", np.array(1, np.int64)),
            mk("ReduceSum", ["attention_mask", "gqa/axes1"], ["gqa/mask_sum"], keepdims=0, name="gqa/ReduceSum"),
            mk("Sub", ["gqa/mask_sum", "gqa/one"], ["gqa/seqlens_k_64"], name="gqa/Sub"),
            mk("Cast", ["gqa/seqlens_k_64"], ["gqa/seqlens_k"], to=onnx.TensorProto.INT32, name="gqa/Cast_seqlens"),
            mk("Shape", ["attention_mask"], ["gqa/mask_shape"], name="gqa/Shape"),
            mk("Gather", ["gqa/mask_shape", "gqa/one"], ["gqa/total_64"], axis=0, name="gqa/Gather"),
            mk("Cast", ["gqa/total_64"], ["gqa/total_len"], to=onnx.TensorProto.INT32, name="gqa/Cast_total")]


def gqa_layer(i: int, attn_out: str, kv_heads: int) -> list[onnx.NodeProto]:
    """RotaryEmbedding (position_ids, the fused caches) on q/k in (B, S, D), then GroupQueryAttention
    writing the layer's attention output and present.{i}.key/value."""
    mk, a = onnx.helper.make_node, f"/llm/model/layers.{i}/self_attn"
    rot = [mk("RotaryEmbedding", [f"{a}/{x}_proj/Add_output_0", "position_ids", "cos_cache", "sin_cache"],
              [f"{a}/gqa_{x}_rot"], name=f"{a}/gqa_rotary_{x}", domain="com.microsoft", interleaved=0,
              num_heads=NUM_HEADS if x == "q" else kv_heads) for x in ("q", "k")]
    att = mk("GroupQueryAttention", [f"{a}/gqa_q_rot", f"{a}/gqa_k_rot", f"{a}/v_proj/Add_output_0",
                                     f"past_key_values.{i}.key", f"past_key_values.{i}.value", "gqa/seqlens_k", "gqa/total_len"],
             [attn_out, f"present.{i}.key", f"present.{i}.value"], name=f"{a}/GroupQueryAttention", domain="com.microsoft",
             num_heads=NUM_HEADS, kv_num_heads=kv_heads, scale=(HIDDEN // NUM_HEADS) ** -0.5, do_rotary=0)
    return [*rot, att]


def gqa_rewrite(src: Path, dst: Path) -> dict:
    """Replace each layer's eager attention (repeat_kv, 4-D causal mask, softmax) of a norm/rotary-fused graph
    by GroupQueryAttention; `dst` goes beside `src` (it reads the same external-data file)."""
    assert dst.parent == src.parent, "the rewritten graph reads its source's external data"
    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    layers = sorted({int(n.name.split("layers.")[1].split("/")[0]) for n in g.node if "/self_attn/o_proj/" in n.name})
    kv_heads = next(i.type.tensor_type.shape.dim[1].dim_value for i in g.input if i.name == "past_key_values.0.key")
    o_proj = {int(n.name.split("layers.")[1].split("/")[0]): n for n in g.node if "/self_attn/o_proj/MatMul" in n.name}
    new = gqa_mask_nodes()
    for i in layers:
        new += gqa_layer(i, o_proj[i].input[0], kv_heads)
    replaced = {o for n in new for o in n.output}
    nodes = [n for n in g.node if not replaced & set(n.output)]
    first = next(k for k, n in enumerate(nodes) if n.op_type in ("MatMul", "MatMulNBits"))
    nodes[first:first] = new  # topological order: after the inputs, before the first projection...
    del g.node[:]
    g.node.extend(nodes)
    prune(g)
    m = _toposort(m)
    onnx.save(m, str(dst))
    log.info("GQA rewrite %s -> %s: %d layers, %d nodes", src, dst, len(layers), len(m.graph.node))
    return {"layers": len(layers), "kv_heads": kv_heads, "nodes": len(m.graph.node)}


def _toposort(m: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.onnx_model import OnnxModel

    om = OnnxModel(m)
    om.topological_sort()
    return om.model


# ---- running ---------------------------------------------------------------------------------------
def session(path: Path, threads: int, spin: bool = True) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    if not spin:  # idle threads sleep: process CPU time is then the work done, whatever else runs on the machine
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


@dataclass
class Tokens:
    """Random token ids (1, n) and their embeddings (1, n, 896) float32."""

    ids: np.ndarray
    emb: np.ndarray

    def __getitem__(self, sl: slice) -> Tokens:
        return Tokens(self.ids[:, sl], self.emb[:, sl])


def tokens(path: Path | None, n: int, seed: int, vocab: int = 151936) -> Tokens:
    """Rows of the bundle's embedding table `path` for random token ids (N(0, 0.02) rows without it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (1, n)).astype(np.int64)
    if path is None:
        return Tokens(ids, (rng.standard_normal((1, n, HIDDEN)) * 0.02).astype(np.float32))
    table = np.load(path, mmap_mode="r")
    return Tokens(ids, np.ascontiguousarray(table[ids[0]][None], np.float32))


def empty_past(s: ort.InferenceSession) -> dict[str, np.ndarray]:
    head = HIDDEN // NUM_HEADS  # genai's graph leaves the head dim symbolic
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else head), np.float32)
            for i in s.get_inputs() if i.name.startswith("past_key_values.")}


def step(s: ort.InferenceSession, x: Tokens, past: dict, start: int) -> tuple[dict, dict]:
    """Run tokens `x` (S of them) at positions start..start+S-1 after `past`; returns (outputs, next past).
    setok's graph takes their embeddings and position_ids, genai's takes input_ids (no position_ids)."""
    n = x.ids.shape[1]
    names_in = {i.name for i in s.get_inputs()}
    feed = {"attention_mask": np.ones((1, start + n), np.int64), **past}
    if "inputs_embeds" in names_in:
        feed["inputs_embeds"] = x.emb
    else:
        feed["input_ids"] = x.ids
    if "position_ids" in names_in:
        feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
    names = [o.name for o in s.get_outputs()]
    out = dict(zip(names, s.run(None, feed)))
    nxt = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
    return out, nxt


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return {"cosine": cos, "max_abs_diff": float(np.abs(x - y).max()), "ref_max_abs": float(np.abs(x).max()),
            "argmax_equal": bool((a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)).all())}


def numerics(ref: Path, other: Path, emb: Tokens, threads: int, prefill: int = 7) -> dict:
    """Logits (and the last present) of `other` vs `ref` for a `prefill`-token prefill and one decode step."""
    res = {}
    outs = {}
    for tag, p in (("ref", ref), ("other", other)):
        s = session(p, threads)
        o1, past = step(s, emb[:prefill], empty_past(s), 0)
        o2, _ = step(s, emb[prefill:prefill + 1], past, prefill)
        outs[tag] = (o1, o2)
        del s
    for i, phase in enumerate(("prefill", "decode")):
        a, b = outs["ref"][i], outs["other"][i]
        res[phase] = {"logits": compare(a["logits"], b["logits"]),
                      "present.23.value": compare(a["present.23.value"], b["present.23.value"])}
    log.info("numerics %s vs %s: %s", other, ref, json.dumps(res))
    return res


def decode_ms(s: ort.InferenceSession, emb: Tokens, prefill: int, steps: int) -> tuple[list[float], list[float]]:
    """(wall ms, process CPU ms) of each of `steps` 1-token decode steps after a `prefill`-token prefill."""
    _, past = step(s, emb[:prefill], empty_past(s), 0)
    wall, cpu = [], []
    for i in range(steps):
        t, c = time.perf_counter(), time.process_time()
        _, past = step(s, emb[prefill + i:prefill + i + 1], past, prefill + i)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return wall, cpu


def bench(paths: dict[str, Path], emb: Tokens, threads: int, rounds: int, prefill: int, steps: int,
          spin: bool = True) -> dict:
    """Round-robin over the variants; per round the median ms/token of each; medians over rounds."""
    sessions = {k: session(p, threads, spin) for k, p in paths.items()}
    for s in sessions.values():  # warm-up (allocations, prepacking)
        decode_ms(s, emb, prefill, 4)
    wall, cpu = ({k: [] for k in paths} for _ in range(2))
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        for k, s in sessions.items():
            w, c = decode_ms(s, emb, prefill, steps)
            wall[k].append(statistics.median(w))
            cpu[k].append(statistics.median(c))
        loads.append(os.getloadavg()[0])
        log.info("round %d: %s load %.2f", r, {k: round(v[-1], 2) for k, v in wall.items()}, loads[-1])
    out = {}
    for k, ms in wall.items():
        med = statistics.median(ms)
        out[k] = {"median_ms_per_token": med, "tokens_per_s": 1000 / med, "best_round_ms": min(ms),
                  "best_round_tokens_per_s": 1000 / min(ms), "round_medians_ms": ms,
                  "median_cpu_ms_per_token": statistics.median(cpu[k]), "round_cpu_ms": cpu[k]}
    return {"variants": out, "rounds": rounds, "threads": threads, "spinning": spin, "prefill": prefill,
            "steps": steps, "loadavg_1min_per_round": loads, "loadavg_at_end": os.getloadavg()}


# ---- driver ----------------------------------------------------------------------------------------
def build(args, res: dict) -> None:
    work, v = args.work, variants(args.work, args.int4)
    fp32_fused = work / "fp32_fused" / "llm.onnx"
    if not fp32_fused.exists():
        res["fusion_stats_fp32"] = fuse(args.fp32, fp32_fused, args.model_type)
    if not v["int4_fused"].exists():
        res["quantize"] = quantize(fp32_fused, v["int4_fused"])
    if not v["int4_then_fused"].exists():
        res["fusion_stats_int4"] = fuse(args.int4, v["int4_then_fused"], args.model_type)
    for src, dst in ((fp32_fused, fp32_fused.with_name("llm_gqa.onnx")), (v["int4_fused"], v["int4_fused_gqa"])):
        if not dst.exists():
            res.setdefault("gqa_rewrite", {})[str(dst)] = gqa_rewrite(src, dst)


def report_graphs(args, res: dict) -> None:
    v = variants(args.work, args.int4)
    fp32_fused = args.work / "fp32_fused" / "llm.onnx"
    graphs = {"fp32": args.fp32, "fp32_fused": fp32_fused, "fp32_fused_gqa": fp32_fused.with_name("llm_gqa.onnx"), **v}
    res["op_counts"] = {k: op_counts(p) for k, p in graphs.items() if p.exists()}
    res["session_op_counts"] = {k: session_op_counts(p, args.work) for k, p in v.items() if p.exists()}
    if args.reference:
        res["session_op_counts"]["genai_graph_reference"] = session_op_counts(args.reference, args.work)
    res["io_identical"] = {**{f"{k} vs fp32": io_same(args.fp32, graphs[k]) for k in ("fp32_fused", "fp32_fused_gqa")},
                           **{f"{k} vs int4_baseline": io_same(args.int4, v[k]) for k in v if k != "int4_baseline"}}


def run_numerics(args, res: dict) -> None:
    emb = tokens(args.embeddings, 8, 1)
    v = variants(args.work, args.int4)
    fp32 = {k: args.work / "fp32_fused" / f for k, f in (("fp32_fused", "llm.onnx"), ("fp32_fused_gqa", "llm_gqa.onnx"))}
    res["numerics"] = {**{f"{k} vs fp32": numerics(args.fp32, p, emb, args.threads) for k, p in fp32.items()},
                       **{f"{k} vs int4_baseline": numerics(args.int4, p, emb, args.threads)
                          for k, p in v.items() if k != "int4_baseline"},
                       "int4_baseline vs fp32 (quantization error, for scale)": numerics(args.fp32, args.int4, emb, args.threads)}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "build", "io", "diagnose", "numerics", "bench"])
    p.add_argument("--fp32", type=Path, default=Path("runs/real/siglip-qwen2.5-0.5b/bundle/llm.onnx"))
    p.add_argument("--int4", type=Path, default=Path("/tmp/bench17/int4h/llm.int4.onnx"))
    p.add_argument("--embeddings", type=Path, default=None, help="llm_embeddings.npy (else N(0, 0.02) inputs)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fuse"))
    p.add_argument("--model-type", default="qwen3", help="optimize_model model_type (qwen3 | gpt2: same fusions)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-spin", dest="spin", action="store_false",
                   help="intra-op threads sleep instead of spinning (CPU ms/token is then the work; results under bench_no_spin)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prefill", type=int, default=40)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None, help="bench only these variants (default: all three)")
    p.add_argument("--reference", type=Path, default=None,
                   help="also time this graph (onnxruntime-genai's builder model.onnx, fed input_ids) in the same rounds")
    p.add_argument("--out", type=Path, default=Path("/tmp/fuse/results.json"))
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse()
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    res["onnxruntime"] = ort.__version__
    if args.what in ("all", "build"):
        build(args, res)
    if args.what in ("all", "build", "io"):
        report_graphs(args, res)
    if args.what in ("all", "diagnose"):
        res["attention_fusion_diagnosis"] = diagnose(args.work / "fp32_fused" / "llm.onnx")
    if args.what in ("all", "numerics"):
        run_numerics(args, res)
    if args.what in ("all", "bench"):
        v = {k: p for k, p in variants(args.work, args.int4).items() if not args.only or k in args.only}
        if args.reference:
            v["genai_graph_reference"] = args.reference
        emb = tokens(args.embeddings, args.prefill + args.steps, 0)
        key = "bench" if args.spin else "bench_no_spin"
        res[key] = bench(v, emb, args.threads, args.rounds, args.prefill, args.steps, args.spin)
        for k, r in res[key]["variants"].items():
            log.info("%s: %.1f tokens/s (%.2f ms/token; best round %.2f; CPU %.2f ms/token)", k, r["tokens_per_s"],
                     r["median_ms_per_token"], r["best_round_ms"], r["median_cpu_ms_per_token"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
