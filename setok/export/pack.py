"""Sibling MatMuls packed into one (the llm's q/k/v projections, and gate/up of a gated MLP).

At decode every token runs each layer's projections on one row. Three MatMuls that read the same
normalised hidden state (q, k and v) cost three kernel calls, three thread-pool dispatches and, once
weight-only quantized, three MatMulNBits nodes; concatenated along N they are one call over the same
weight bytes. onnxruntime-genai's model builder writes its Qwen2 and Llama graphs that way (one
MatMulNBits for q/k/v); this does the same on optimum's export, structurally: every group of MatMuls
that share their first input and have constant 2-D weights with the same K becomes one MatMul
(weights concatenated, biases too when each member has its own constant bias Add) and a Split whose
outputs keep the old tensor names, so nothing downstream changes. The result is the same
computation (each output column is the same dot product).

Weights may live in external data: the packed ones are appended as new tensors and the whole data
file is rewritten with only the tensors the graph still reads (`save_with_data`), so the dropped
q/k/v tensors leave no dead bytes behind.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from setok.export.external import WEIGHT_MIN_NUMEL, append_tensor, external_ref
from setok.export.graph import Graph

log = logging.getLogger(__name__)


def read_initializer(tensor, base: Path) -> np.ndarray:
    """An initializer's values, mapped from its external data file when it has one."""
    import onnx

    ref = external_ref(tensor)
    if ref is None:
        return onnx.numpy_helper.to_array(tensor)
    location, offset, _ = ref
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(Path(base) / location, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


def _weight(inits: dict, node) -> object | None:
    """The constant 2-D float weight of MatMul `node` (its second input), else None."""
    import onnx

    t = inits.get(node.input[1])
    ok = t is not None and len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return t if ok else None


def _bias(gr: Graph, node, n: int):
    """The Add right after MatMul `node` with a constant (N,) bias, when it is the MatMul's only reader."""
    add = gr.only(node.output[0], "Add")
    if add is None:
        return None
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    t = gr.consts.get(gr.through_identity(other))
    return (add, t) if t is not None and list(t.dims) == [n] else None


def _groups(g) -> list[list]:
    """MatMuls with constant weights grouped by their shared activation input (K must agree)."""
    inits = {t.name: t for t in g.initializer}
    by_input = defaultdict(list)
    for node in g.node:
        if node.op_type == "MatMul" and _weight(inits, node) is not None:
            by_input[node.input[0]].append(node)
    groups = []
    for nodes in by_input.values():
        ks = {inits[n.input[1]].dims[0] for n in nodes}
        dtypes = {inits[n.input[1]].data_type for n in nodes}
        if len(nodes) > 1 and len(ks) == 1 and len(dtypes) == 1:
            groups.append(nodes)
    return groups


class Concat:
    """A packed weight, concatenated only when it is written: the parts are mapped from the data file,
    so an 8B model's packed q/k/v and gate/up (~18 GB fp32) never sit in memory at once."""

    def __init__(self, parts: list[np.ndarray], axis: int):
        self.parts, self.axis = parts, axis
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        self.shape, self.dtype, self.size = tuple(shape), parts[0].dtype, int(np.prod(shape))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts, self.axis)
        return out if dtype is None else out.astype(dtype)


def declare(g, nodes: list, elem_type: int) -> None:
    """Typed value_info for the new nodes' outputs: shape inference cannot pass the com.microsoft ops
    these graphs hold, and ONNX Runtime's quantizers need every MatMul's types (rank unknown here)."""
    import onnx

    known = {v.name for v in (*g.value_info, *g.output)}
    for n in nodes:
        for out in n.output:
            if out and out not in known:
                g.value_info.append(onnx.helper.make_tensor_value_info(out, elem_type, None))


def pack_siblings(model, base: Path) -> dict[str, np.ndarray | Concat]:
    """Pack each group of sibling MatMuls of `model` (in place). Returns the new weights and biases by
    name, for `save_with_data` to store; the members' old ones are no longer read."""
    import onnx

    g = model.graph
    gr = Graph(g)
    inits = gr.consts
    new, replace = {}, {}  # replace: id(first member) -> the packed nodes; other members -> []
    groups = _groups(g)
    for group in groups:
        ns = [int(inits[n.input[1]].dims[1]) for n in group]
        biases = [_bias(gr, n, k) for n, k in zip(group, ns)]
        with_bias = all(b is not None for b in biases)
        name = f"{group[0].name}/packed{len(group)}"
        new[name + ".weight"] = Concat([read_initializer(inits[n.input[1]], base) for n in group], 1)
        outs = [b[0].output[0] for b in biases] if with_bias else [n.output[0] for n in group]
        mk = onnx.helper.make_node
        nodes = [mk("MatMul", [group[0].input[0], name + ".weight"], [name + "_mm"], name=name + "/MatMul")]
        y = name + "_mm"
        if with_bias:
            new[name + ".bias"] = Concat([read_initializer(b[1], base) for b in biases], 0)
            nodes.append(mk("Add", [y, name + ".bias"], [name + "_add"], name=name + "/Add"))
            y = name + "_add"
        declare(g, nodes, inits[group[0].input[1]].data_type)
        new[name + ".split"] = np.array(ns, np.int64)
        nodes.append(mk("Split", [y, name + ".split"], outs, axis=-1, name=name + "/Split"))
        replace[id(group[0])] = nodes
        for member, b in zip(group, biases):
            replace.setdefault(id(member), [])
            if with_bias:
                replace[id(b[0])] = []
    kept = []
    for node in g.node:
        kept.extend(replace.get(id(node), [node]))
    del g.node[:]
    g.node.extend(kept)
    log.info("packed %d MatMuls into %d", sum(map(len, groups)), len(groups))
    return new


def _check_space(folder: Path, external: list, new: dict) -> None:
    """The fresh data file is written beside the old one: refuse up front, by name, if it cannot fit."""
    import shutil

    from setok.errors import InputError

    need = sum(external_ref(t)[2] for t in external) + sum(int(a.size) * np.dtype(a.dtype).itemsize for a in new.values())
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(f"{folder}: {free / 1e9:.1f} GB free, but packing the llm's weights writes a new "
                         f"{need / 1e9:.1f} GB data file beside the old one; expected that much free space")


def save_with_data(model, path: Path, new: dict[str, np.ndarray | Concat]) -> None:
    """Save `model` to `path` with the arrays `new` as initializers and only the initializers its nodes
    read. With external data, every kept external tensor is copied into a fresh `<graph>.data` (the
    graph's old data file is read while it is written, then replaced); inline graphs stay inline."""
    import onnx

    from setok.io import atomic_file

    g, path = model.graph, Path(path)
    read = {x for n in g.node for x in n.input}
    kept = [t for t in g.initializer if t.name in read and t.name not in new]
    new = {k: a for k, a in new.items() if k in read}
    external = any(external_ref(t) is not None for t in g.initializer)
    del g.initializer[:]
    if not external:
        g.initializer.extend(kept)
        g.initializer.extend(onnx.numpy_helper.from_array(np.asarray(a), k) for k, a in new.items())
        with atomic_file(path) as tmp:
            onnx.save(model, str(tmp))
        return
    data_name = path.name + ".data"
    _check_space(path.parent, [t for t in kept if external_ref(t) is not None], new)
    with atomic_file(path.parent / data_name) as data_tmp:
        offset = 0
        with open(data_tmp, "wb") as f:
            for t in kept:
                if external_ref(t) is not None:
                    arr = np.ascontiguousarray(read_initializer(t, path.parent))
                    offset = append_tensor(f, t, arr, data_name, offset)
                g.initializer.append(t)
            for k, a in new.items():
                if a.size < WEIGHT_MIN_NUMEL:  # split sizes: inline, like the exporter's own constants
                    g.initializer.append(onnx.numpy_helper.from_array(np.asarray(a), k))
                    continue
                t = onnx.TensorProto(name=k, dims=a.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype))
                offset = append_tensor(f, t, np.ascontiguousarray(np.asarray(a)), data_name, offset)  # one at a time
                g.initializer.append(t)
        with atomic_file(path) as tmp:  # the graph's references are to the new file's offsets
            onnx.save(model, str(tmp))
    log.info("%s: %.2f GB of weights rewritten to %s", path.name, offset / 1e9, data_name)
