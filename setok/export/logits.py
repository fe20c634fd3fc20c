"""The LM head for each row's newest real token only (`setok export --llm-logits newest`).

A prefill of S tokens otherwise multiplies all S rows by the vocabulary-sized head and returns
(B, S, V) logits, of which the runtime reads one row per sequence (backends/decode.py take_newest):
at Qwen2.5's 151,936-token vocabulary and a 300-token image + question that is ~40 GMAC and a 180 MB
logits tensor per prompt. Rewritten, `logits` is (B, 1, V); `hidden_states` stays (B, S, H) (the seg
head reads every position). Which column is the newest depends on the attention form:

- GQA form (export/attention.py): the cache is ragged per row, the newest is seqlens_k - past length;
- eager form (the one TensorRT builds): the cache has one length for every row and padding holes are
  masked, so the newest is the last position of this call whose mask is 1 (ArgMax over mask x 1..T,
  minus the past length; standard ops TensorRT parses).

A row with no real token in the call (a finished row of a batch) reads column 0, never out of range.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from setok import manifest as M
from setok.errors import InputError
from setok.export.pack import declare

PREFIX = "newest"


def newest_logits(g, column: Callable[[str, str], list]) -> bool:
    """Have the LM head MatMul read only the newest row of `g`. `column(prefix, h)`: the nodes that
    compute f"{prefix}/col" (B,) int64 for the head input `h` (B, S, H). False (graph unchanged)
    when `logits` is not one MatMul's output (a logit soft-cap, a Gemm head)."""
    import onnx

    head = next((n for n in g.node if M.LOGITS in n.output), None)
    if head is None or head.op_type != "MatMul":
        return False
    mk, h, p = onnx.helper.make_node, head.input[0], PREFIX
    nodes = [*column(p, h),
             mk("Unsqueeze", [f"{p}/col", f"{p}/axis1"], [f"{p}/index"], name=f"{p}/Unsqueeze_index"),  # (B, 1)
             mk("GatherND", [h, f"{p}/index"], [f"{p}/row"], batch_dims=1, name=f"{p}/GatherND"),  # (B, H)
             mk("Unsqueeze", [f"{p}/row", f"{p}/axis1"], [f"{p}/h"], name=f"{p}/Unsqueeze")]  # (B, 1, H)
    g.initializer.extend(_constants(p))
    at = list(g.node).index(head)
    head.input[0] = f"{p}/h"
    declare(g, nodes[-2:], onnx.TensorProto.FLOAT)
    out = next(o for o in g.output if o.name == M.LOGITS)
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_value = 1
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    return True


def gqa_column(p: str, h: str) -> list:
    """seqlens_k - past length (the GQA rewrite's `gqa/seqlens_k_64` and `gqa/total_64`), at least 0."""
    mk = _mk()
    return [mk("Shape", [h], [f"{p}/h_shape"], name=f"{p}/Shape"),
            mk("Gather", [f"{p}/h_shape", f"{p}/one"], [f"{p}/chunk"], axis=0, name=f"{p}/Gather"),
            mk("Sub", ["gqa/total_64", f"{p}/chunk"], [f"{p}/past"], name=f"{p}/Sub_past"),
            mk("Sub", ["gqa/seqlens_k_64", f"{p}/past"], [f"{p}/raw"], name=f"{p}/Sub"),
            mk("Max", [f"{p}/raw", f"{p}/zero"], [f"{p}/col"], name=f"{p}/Max")]


def mask_column(p: str, h: str) -> list:
    """The last position of the call whose attention_mask is 1, minus the past length, at least 0."""
    mk = _mk()
    return [mk("Shape", [h], [f"{p}/h_shape"], name=f"{p}/Shape"),
            mk("Gather", [f"{p}/h_shape", f"{p}/one"], [f"{p}/chunk"], axis=0, name=f"{p}/Gather"),  # S
            mk("Shape", [M.ATTENTION_MASK], [f"{p}/mask_shape"], name=f"{p}/Shape_mask"),
            mk("Gather", [f"{p}/mask_shape", f"{p}/one"], [f"{p}/total"], axis=0, name=f"{p}/Gather_total"),  # T
            mk("Add", [f"{p}/total", f"{p}/one"], [f"{p}/limit"], name=f"{p}/Add_limit"),
            mk("Range", [f"{p}/one", f"{p}/limit", f"{p}/one"], [f"{p}/ramp"], name=f"{p}/Range"),  # 1..T
            mk("Cast", [M.ATTENTION_MASK], [f"{p}/mask"], to=7, name=f"{p}/Cast"),  # int64
            mk("Mul", [f"{p}/mask", f"{p}/ramp"], [f"{p}/ranked"], name=f"{p}/Mul"),  # (B, T)
            mk("ArgMax", [f"{p}/ranked"], [f"{p}/last"], axis=1, keepdims=0, name=f"{p}/ArgMax"),  # (B,)
            mk("Sub", [f"{p}/total", f"{p}/chunk"], [f"{p}/past"], name=f"{p}/Sub_past"),
            mk("Sub", [f"{p}/last", f"{p}/past"], [f"{p}/raw"], name=f"{p}/Sub"),
            mk("Max", [f"{p}/raw", f"{p}/zero"], [f"{p}/col"], name=f"{p}/Max")]


def rewrite_newest(path: Path) -> None:
    """The eager llm graph at `path` with newest-token logits, in place (atomically; the graph file
    only: external weights are untouched)."""
    import onnx

    from setok.io import atomic_file

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not newest_logits(model.graph, mask_column):
        head = next((n.op_type for n in model.graph.node if M.LOGITS in n.output), "no node")
        raise InputError(f"--llm-logits newest: the llm's logits come from {head}; expected the LM head as one MatMul")
    with atomic_file(path) as tmp:
        onnx.save(model, str(tmp))


def _mk():
    import onnx

    return onnx.helper.make_node


def _constants(p: str) -> list:
    import numpy as np
    import onnx

    arr = onnx.numpy_helper.from_array
    return [arr(np.array([1], np.int64), f"{p}/axis1"), arr(np.array(1, np.int64), f"{p}/one"),
            arr(np.array(0, np.int64), f"{p}/zero")]
