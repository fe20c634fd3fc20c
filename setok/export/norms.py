"""RMSNorm as ONNX Runtime's (Skip)SimplifiedLayerNormalization, the residual Add folded in.

HF's RMSNorm exports as Cast, Pow, ReduceMean, Add(eps), Sqrt, Div(1, .), Mul, Cast, Mul(weight).
ONNX Runtime's session optimizer fuses that into SimplifiedLayerNormalization itself, but not the
residual Add in front of it, which onnxruntime-genai's graphs carry inside
`com.microsoft::SkipSimplifiedLayerNormalization` (its fourth output is the sum the next residual
reads): one node per norm instead of two, 2 x layers at every decode step. Structural, by pattern
from the ReduceMean; a norm that does not match exactly stays as exported.
"""

from __future__ import annotations

import logging

import numpy as np

from setok.export.graph import Graph

log = logging.getLogger(__name__)

SKIP_NORM, NORM, MS_DOMAIN = "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "com.microsoft"


class _Lookup(Graph):
    def through_cast(self, name: str) -> str:
        """Skip float->float Casts (the norm's upcast of an fp32 graph)."""
        n = self.producer.get(name)
        while n is not None and n.op_type == "Cast" and [a.i for a in n.attribute if a.name == "to"] == [1]:
            name, n = n.input[0], self.producer.get(n.input[0])
        return name


def _is(value: np.ndarray | None, k: float) -> bool:
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == k


def _other(node, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _match(lk: _Lookup, reduce) -> tuple[str, str, float, object] | None:
    """(x, weight, epsilon, the last node) of the RMSNorm whose ReduceMean is `reduce`, else None."""
    axes = [list(a.ints) for a in reduce.attribute if a.name == "axes"]
    pow_ = lk.producer.get(reduce.input[0])
    if axes != [[-1]] or pow_ is None or pow_.op_type != "Pow" or not _is(lk.const(pow_.input[1]), 2):
        return None
    x = pow_.input[0]
    add = lk.only(reduce.output[0], "Add")
    eps = lk.const(_other(add, reduce.output[0])) if add is not None else None
    sqrt = lk.only(add.output[0], "Sqrt") if eps is not None and eps.size == 1 else None
    div = lk.only(sqrt.output[0], "Div") if sqrt is not None else None
    if div is None or div.input[1] != sqrt.output[0] or not _is(lk.const(div.input[0]), 1):
        return None
    mul = lk.only(div.output[0], "Mul")
    if mul is None or _other(mul, div.output[0]) != x:
        return None
    last = mul
    cast = lk.only(mul.output[0], "Cast")
    if cast is not None and [a.i for a in cast.attribute if a.name == "to"] == [1]:
        last = cast
    scale = lk.only(last.output[0], "Mul")
    weight = lk.through_identity(_other(scale, last.output[0])) if scale is not None else None
    if weight not in lk.consts or len(lk.consts[weight].dims) != 1:
        return None
    return x, weight, float(eps.reshape(-1)[0]), scale


def fuse_norms(g) -> dict[str, int]:
    """Rewrite each matched RMSNorm in place; counts of the two forms written."""
    import onnx

    lk, mk = _Lookup(g), onnx.helper.make_node
    replace, renames, counts = {}, {}, {NORM: 0, SKIP_NORM: 0}
    for reduce in [n for n in g.node if n.op_type == "ReduceMean"]:
        found = _match(lk, reduce)
        if found is None:
            continue
        x, weight, eps, last = found
        src = lk.through_cast(x)
        add = lk.producer.get(src)
        residual = add is not None and add.op_type == "Add" and not any(i in lk.consts for i in add.input)
        if residual:  # the Add's own output stays, as the fused node's fourth output
            node = mk(SKIP_NORM, [*add.input, weight], [last.output[0], "", "", src], domain=MS_DOMAIN,
                      epsilon=eps, name=reduce.name + "/" + SKIP_NORM)
            replace[id(add)] = []
        else:
            node = mk(NORM, [src, weight], [last.output[0]], axis=-1, epsilon=eps, stash_type=1,
                      name=reduce.name + "/" + NORM)
        renames[x] = src  # the upcast's readers (the residual) read the fp32 sum itself
        replace[id(last)] = [node]
        counts[node.op_type] += 1
    kept = []
    for n in g.node:
        for new in replace.get(id(n), [n]):
            for i, name in enumerate(new.input):
                new.input[i] = renames.get(name, name)
            kept.append(new)
    del g.node[:]
    g.node.extend(kept)
    return counts
