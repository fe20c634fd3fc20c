"""The llm graph's attention as ONNX Runtime's GroupQueryAttention (`setok export --llm-attention gqa`).

optimum's TorchScript export writes each layer's attention as plain ops: the new key/value rows are
concatenated onto the past (the presents), repeated to every query head (repeat_kv), multiplied,
masked by a 4-D causal mask built from `attention_mask`, soft-maxed and multiplied again. ONNX Runtime's
transformer optimizer fuses none of it on this graph (docs/quantization.md, "ORT's fusions"), and at
decode those ~60 nodes per layer cost more than the layer's int4 MatMuls. `com.microsoft`
GroupQueryAttention does the same in one kernel (no repeat_kv copy, no 4-D mask): measured +12-25 %
decode tokens/s at the Qwen2.5-0.5B shape. It is an ONNX Runtime contrib op, so this form is for ONNX
Runtime only; TensorRT builds from the default (eager) form.

The rewrite is structural, not by node names: for layer i the presents' Concat gives the new key and
value rows, the MatMul reading the (repeated) present key gives the query, the ops between it and the
Softmax give the scale, and the Transpose/Reshape after the second MatMul give the output o_proj reads.
Anything else on that path (a logit soft-cap, a sliding-window mask) stops the rewrite with an error.
HF's rotary embedding (x * cos + rotate_half(x) * sin on q and k) becomes RotaryEmbedding on
`position_ids` with the model's own cos/sin tables; another rotary form stays as exported (q and k
then arrive rotated).

Where a projection's output only went through Reshape + Transpose to (B, heads, S, hd), the GQA input
is that (B, S, heads * hd) output itself (no transpose round trip), and the q/k/v projections, like an
MLP's gate/up, are then packed into one MatMul each (export/pack.py, onnxruntime-genai's layout). A
GQA node whose q/k/v are one packed projection then takes it whole and rotates q and k itself
(do_rotary=1 with the same tables): its positions come from the lengths (past length + offset per
row), which equal position_ids for the right-padded rows the runtime sends. RMSNorm and the residual
Add become SkipSimplifiedLayerNormalization (export/norms.py), and the LM head reads only each row's
newest token (export/logits.py). onnxruntime-genai's model builder writes the same layout.

GroupQueryAttention reads the mask as lengths (`seqlens_k` = real tokens - 1, per row): a batched prompt
must be right-padded, which the runtime does for every llm form (backends/decode.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from setok import manifest as M
from setok.errors import InputError
from setok.export.graph import Graph
from setok.export.logits import gqa_column, newest_logits
from setok.export.norms import NORM, SKIP_NORM, fuse_norms
from setok.export.pack import declare, pack_siblings, save_with_data

log = logging.getLogger(__name__)

EAGER, GQA = M.EAGER_ATTENTION, M.GQA_ATTENTION
GQA_OP = "GroupQueryAttention"
MS_DOMAIN = "com.microsoft"
# Ops allowed between the QK MatMul and the PV MatMul: scale, mask, softmax, dtype round trips.
_SCORE_OPS = {"Mul", "Div", "Add", "Softmax", "Cast"}
_KV_REPEAT_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze"}  # present key -> the QK MatMul (repeat_kv)


def rope_tables(llm) -> tuple[np.ndarray, np.ndarray] | None:
    """(max_positions, head_dim / 2) cos and sin of the LLM's rotary embedding, from its own module (so
    its scaling, e.g. Llama 3's, is included); None when they depend on the sequence length (dynamic,
    longrope) or the module is not HF's usual `model.rotary_emb` with duplicated halves."""
    import torch

    rope = getattr(getattr(llm, "model", None), "rotary_emb", None)
    kind = (getattr(llm.config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope is None or kind in ("dynamic", "longrope"):
        return None
    with torch.no_grad():
        pos = torch.arange(llm.config.max_position_embeddings)[None]
        cos, sin = (t[0].float().numpy() for t in rope(torch.zeros(1, dtype=torch.float32), pos))
    half = cos.shape[-1] // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    return cos[:, :half], sin[:, :half]


def check_supported(config) -> None:
    """Refuse architectures whose attention GroupQueryAttention here would not reproduce."""
    if getattr(config, "attn_logit_softcapping", None):
        raise InputError(f"--llm-attention gqa: {config.model_type} soft-caps attention logits; expected an "
                          "LLM without attn_logit_softcapping (export with --llm-attention eager)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise InputError(f"--llm-attention gqa: {config.model_type} uses a sliding window of "
                          f"{config.sliding_window}; expected full attention (export with --llm-attention eager)")


class _Graph(Graph):
    """The lookups, plus the rewrite's own strict reader check."""

    def only_consumer(self, name: str, layer: int):
        users = [n for n in self.consumers[name] if n.op_type != "Shape"]
        if len(users) != 1:
            raise InputError(f"--llm-attention gqa: layer {layer}: {name} has {len(users)} readers; expected 1")
        return users[0]


def _qk_matmul(gr: _Graph, present_key: str, layer: int):
    """The MatMul whose second input is the present key, through repeat_kv's and the transpose's ops."""
    todo = [present_key]
    while todo:
        name = todo.pop()
        for n in gr.consumers[name]:
            if n.op_type == "MatMul" and n.input[1] == name:
                return n
            if n.op_type in _KV_REPEAT_OPS and n.input[0] == name:
                todo.append(n.output[0])
    raise InputError(f"--llm-attention gqa: layer {layer}: no MatMul reads {present_key}; expected the "
                      "attention's Q x K^T")


def _scores(gr: _Graph, qk, layer: int) -> tuple[float, object]:
    """Follow the scores from Q x K^T to the PV MatMul: (the scale applied, the PV MatMul)."""
    scale, node = 1.0, gr.only_consumer(qk.output[0], layer)
    while node.op_type != "MatMul":
        if node.op_type not in _SCORE_OPS:
            raise InputError(f"--llm-attention gqa: layer {layer}: {node.op_type} ({node.name}) between the "
                              f"attention's MatMuls; expected only {sorted(_SCORE_OPS)}")
        if node.op_type in ("Mul", "Div"):
            c = [gr.const(x) for x in node.input]
            value = next((v for v in c if v is not None and v.size == 1), None)
            if value is None:
                raise InputError(f"--llm-attention gqa: layer {layer}: {node.name} scales by a tensor; expected a constant")
            scale = scale * float(value) if node.op_type == "Mul" else scale / float(value)
        node = gr.only_consumer(node.output[0], layer)
    return scale, node


def _output(gr: _Graph, pv, layer: int) -> str:
    """(B, heads, S, hd) -> Transpose -> (B, S, heads, hd) -> Reshape -> (B, S, heads * hd): that name."""
    t = gr.only_consumer(pv.output[0], layer)
    perm = [a.ints for a in t.attribute if a.name == "perm"]
    r = gr.only_consumer(t.output[0], layer) if t.op_type == "Transpose" else None
    if r is None or r.op_type != "Reshape" or list(perm[0]) != [0, 2, 1, 3]:
        raise InputError(f"--llm-attention gqa: layer {layer}: attention output is not Transpose(0,2,1,3) + Reshape")
    return r.output[0]


def _flat(gr: _Graph, x: str) -> str | None:
    """The (B, S, heads * hd) projection output `x` was made from by Reshape + Transpose(0, 2, 1, 3)
    (so no round trip back is needed), else None."""
    t = gr.producer.get(x)
    r = gr.producer.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
    if r is None or r.op_type != "Reshape" or [list(a.ints) for a in t.attribute if a.name == "perm"] != [[0, 2, 1, 3]]:
        return None
    src = gr.producer.get(r.input[0])
    return r.input[0] if src is not None and src.op_type in ("MatMul", "Add") else None


def _bsd(mk, x: str, out: str, gr: _Graph | None = None) -> list:
    """(B, heads, S, hd) -> (B, S, heads * hd), the layout GroupQueryAttention takes."""
    flat = _flat(gr, x) if gr is not None else None
    if flat is not None:
        return [mk("Identity", [flat], [out], name=out + "/Identity")]
    return [mk("Transpose", [x], [out + "_bshd"], perm=[0, 2, 1, 3], name=out + "/Transpose"),
            mk("Reshape", [out + "_bshd", "gqa/bsd_shape"], [out], name=out + "/Reshape")]


def _mask_nodes(mk) -> list:
    """seqlens_k = real tokens - 1 per row and total_sequence_length = mask width, both int32."""
    import onnx

    i32 = onnx.TensorProto.INT32
    return [mk("ReduceSum", [M.ATTENTION_MASK, "gqa/axis1"], ["gqa/mask_sum"], keepdims=0, name="gqa/ReduceSum"),
            mk("Sub", ["gqa/mask_sum", "gqa/one"], ["gqa/seqlens_k_64"], name="gqa/Sub"),
            mk("Cast", ["gqa/seqlens_k_64"], ["gqa/seqlens_k"], to=i32, name="gqa/Cast_seqlens"),
            mk("Shape", [M.ATTENTION_MASK], ["gqa/mask_shape"], name="gqa/Shape"),
            mk("Gather", ["gqa/mask_shape", "gqa/one"], ["gqa/total_64"], axis=0, name="gqa/Gather"),
            mk("Cast", ["gqa/total_64"], ["gqa/total_len"], to=i32, name="gqa/Cast_total")]


def _unrotated(gr: _Graph, name: str) -> str | None:
    """The tensor HF's rotary embedding was applied to, if `name` is x * cos + rotate_half(x) * sin
    (rotate_half = Concat(-x[..., d/2:], x[..., :d/2])); None for any other form (partial rotary...)."""
    add = gr.producer.get(name)
    if add is None or add.op_type != "Add":
        return None
    muls = [gr.producer.get(x) for x in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for plain, turned in (muls, muls[::-1]):
        for cat in (gr.producer.get(x) for x in turned.input):
            if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
                continue
            neg, low = gr.producer.get(cat.input[0]), gr.producer.get(cat.input[1])
            high = gr.producer.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
            if high is None or low is None or high.op_type != "Slice" or low.op_type != "Slice":
                continue
            x = high.input[0]
            if low.input[0] == x and x in plain.input:
                return x
    return None


def _rotated(mk, gr: _Graph, name: str, out: str, heads: int, rotary: bool) -> list:
    """`name` as (B, S, heads * hd) for GroupQueryAttention; HF's rotary ops become one RotaryEmbedding
    (position_ids, the cached cos/sin) when `rotary` and the pattern is HF's full-width rope."""
    x = _unrotated(gr, name) if rotary else None
    if x is None:
        return _bsd(mk, name, out, gr)
    return [*_bsd(mk, x, out + "_plain", gr),
            mk("RotaryEmbedding", [out + "_plain", M.POSITION_IDS, "gqa/cos_cache", "gqa/sin_cache"], [out],
               name=out + "/RotaryEmbedding", domain=MS_DOMAIN, interleaved=0, num_heads=heads)]


def _layer(gr: _Graph, layer: int, kv: M.KvCache, heads: int, kv_heads: int,
           rotary: bool) -> tuple[str, list, set[str]]:
    """(the node output GQA replaces, the new nodes, names of outputs no longer produced by old nodes)."""
    import onnx

    mk = onnx.helper.make_node
    past_k, past_v = kv.past[2 * layer], kv.past[2 * layer + 1]
    pres_k, pres_v = kv.present[2 * layer], kv.present[2 * layer + 1]
    new = {}
    for past, pres in ((past_k, pres_k), (past_v, pres_v)):
        cat = gr.producer.get(pres)
        if cat is None or cat.op_type != "Concat" or list(cat.input[:1]) != [past] or len(cat.input) != 2:
            raise InputError(f"--llm-attention gqa: layer {layer}: {pres} is not Concat({past}, new); "
                              "expected optimum's KV-cache graph")
        new[pres] = cat.input[1]
    qk = _qk_matmul(gr, pres_k, layer)
    scale, pv = _scores(gr, qk, layer)
    out = _output(gr, pv, layer)
    a = f"/gqa/layers.{layer}"
    nodes = [*_rotated(mk, gr, qk.input[0], f"{a}/q", heads, rotary),
             *_rotated(mk, gr, new[pres_k], f"{a}/k", kv_heads, rotary), *_bsd(mk, new[pres_v], f"{a}/v", gr)]
    nodes.append(mk(GQA_OP, [f"{a}/q", f"{a}/k", f"{a}/v", past_k, past_v, "gqa/seqlens_k", "gqa/total_len"],
                    [out, pres_k, pres_v], name=f"{a}/{GQA_OP}", domain=MS_DOMAIN, num_heads=heads,
                    kv_num_heads=kv_heads, scale=scale, do_rotary=0))
    return out, nodes, {out, pres_k, pres_v}


def fold_packed_rotary(g) -> int:
    """Where a GroupQueryAttention's q, k and v are the three outputs of one packed projection's Split
    (q and k each through a RotaryEmbedding on the tables), feed it the packed tensor instead and let it
    rotate q and k itself (do_rotary=1: its positions are past length + offset per row, which is what
    position_ids holds for the right-padded rows the runtime sends). Returns layers folded."""
    gr, folded = _Graph(g), 0
    for node in g.node:
        if node.op_type != GQA_OP or len(node.input) < 3 or not node.input[1]:
            continue
        srcs, ropes = [], []
        for x in node.input[:3]:
            r = gr.producer.get(x)
            if r is not None and r.op_type == "RotaryEmbedding":
                ropes.append(r)
                x = r.input[0]
            srcs.append(gr.through_identity(x))
        split = gr.producer.get(srcs[0])
        if len(ropes) != 2 or split is None or split.op_type != "Split" or list(split.output) != srcs:
            continue
        tables = list(ropes[0].input[2:4])
        inputs = [split.input[0], "", "", *node.input[3:7], *tables]
        del node.input[:]
        node.input.extend(inputs)
        for a in node.attribute:
            if a.name == "do_rotary":
                a.i = 1
        folded += 1
    return folded


def _constants() -> list:
    import onnx

    arr = onnx.numpy_helper.from_array
    return [arr(np.array([0, 0, -1], np.int64), "gqa/bsd_shape"), arr(np.array([1], np.int64), "gqa/axis1"),
            arr(np.array(1, np.int64), "gqa/one"), arr(np.array(0, np.int64), "gqa/zero")]


def prune(g) -> int:
    """Drop nodes no graph output depends on, then initializers nothing reads; returns nodes dropped."""
    producer = {o: n for n in g.node for o in n.output}
    live, todo = set(), [o.name for o in g.output]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in live:
            live.add(id(n))
            todo.extend(x for x in n.input if x)
    keep = [n for n in g.node if id(n) in live]
    dropped = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(keep)
    read = {x for n in g.node for x in n.input}
    inits = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(inits)
    return dropped


def rewrite_gqa(path: Path, heads: int, kv_heads: int, rope: tuple[np.ndarray, np.ndarray] | None = None,
                newest: bool = True) -> dict[str, int]:
    """Rewrite the llm graph at `path` in place (atomically), then pack its sibling projections
    (export/pack.py; external weights are rewritten to a fresh data file beside it). `rope`: the
    (max_positions, head_dim / 2) cos and sin tables of the model's rotary embedding; with them HF's
    rotary ops become GroupQueryAttention's own (or RotaryEmbedding nodes where q/k/v stay apart).
    newest: the LM head reads only each row's newest token (export/logits.py). Returns counts for the log."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    gr = _Graph(g)
    outputs = {o.name for o in g.output}
    bound = M.KvCache.for_layers(len(g.output))  # the output count bounds the layers
    kv = M.KvCache.for_layers(sum(p in outputs for p in bound.present) // 2)
    at, replaced = {}, set()
    for layer in range(len(kv.past) // 2):
        out, nodes, outs = _layer(gr, layer, kv, heads, kv_heads, rope is not None)
        at[out], replaced = nodes, replaced | outs
    before = len(g.node)
    mk = onnx.helper.make_node
    nodes = _mask_nodes(mk)
    for n in g.node:  # each layer's GQA where its old output was produced: inputs are all earlier
        if set(n.output) & replaced:
            nodes.extend(at.pop(n.output[0], []))
        else:
            nodes.append(n)
    if at:
        raise InputError(f"--llm-attention gqa: attention outputs {sorted(at)} not found in graph order")
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(_constants())
    if rope is not None:
        g.initializer.extend(onnx.numpy_helper.from_array(np.ascontiguousarray(t, np.float32), f"gqa/{n}_cache")
                             for n, t in zip(("cos", "sin"), rope))
    newest = newest and newest_logits(g, gqa_column)
    norms = fuse_norms(g)  # RMSNorm + the residual Add in front of it: one node
    dropped = prune(g)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    packed = pack_siblings(model, path.parent)  # q/k/v (and gate/up) as one MatMul each
    folded = fold_packed_rotary(g) if rope is not None else 0
    prune(g)
    # Types past the contrib ops, for tools that run ONNX shape inference (ORT's quantizers).
    declare(g, [n for n in g.node if n.domain == MS_DOMAIN or n.op_type == NORM], onnx.TensorProto.FLOAT)
    save_with_data(model, path, packed)
    stats = {"layers": len(kv.past) // 2, "nodes_before": before, "nodes_after": len(g.node), "dropped": dropped,
             "rotary": sum(n.op_type == "RotaryEmbedding" for n in g.node),
             "packed": sum(k.endswith(".split") for k in packed), "packed_qkv": folded,
             "newest_logits": int(newest), "norms": norms[NORM], "skip_norms": norms[SKIP_NORM]}
    log.info("llm attention -> %s: %s", GQA_OP, stats)
    return stats
