"""TorchScript ONNX export that streams large weights to one external-data file.

Why: for a graph just under the 2 GB protobuf limit (a Qwen2.5-0.5B-shaped LLM is 1.98 GB of fp32
weights) PyTorch's TorchScript exporter keeps everything in memory at once: the module's weights,
the constant-folded copies it makes (every Linear weight transposed for MatMul), the ModelProto
holding all of them, and its serialized bytes. That measured 8.8 GB peak RSS (4.5x the weights) for
the 0.5B LLM. Above 2 GB the C++ encoder writes external data itself, but below it there is no way
to ask for it.

What this does instead: export the graph *without* parameters (`export_params=False`, so they stay
as graph inputs and the proto is a few MB), keep hold of the exporter's own parameter dictionary
(the folded tensors, under the names the graph uses), then turn each such graph input into an
initializer whose bytes are appended to `<graph>.data`, one tensor at a time. The graph is the one
the exporter would have written (same nodes and folded constants); only where the weights live
differs.

That still left the folded copies: TorchScript exports `nn.Linear` as MatMul(x, Transpose(W)) and
constant folding materialises every W^T (1.4 GB of the 0.5B LLM, 0.5 GB more for a tied LM head).
`linear_views` has each Linear multiply by a buffer that is a transposed *view* of its weight, so
the graph is the same MatMul(x, W^T) + Add(b) with nothing to fold, and W^T is made contiguous one
tensor at a time while it is written. And the exporter's ONNX shape inference gets the weights'
shapes only (their values were copied into per-node protos, +1.75 GB). Peak: the module's own
weights plus the largest tensor.

The exporter's internal `_model_to_graph` is wrapped to see that dictionary; where a PyTorch
version lacks it, `capture_params` raises `LookupError` and the caller falls back to a plain export.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Page-aligned offsets: ONNX Runtime maps external data into memory, which wants aligned offsets.
ALIGN = 4096
# Floating-point tensors at least this large are weights to the shape inference (their values never
# decide a shape).
WEIGHT_MIN_NUMEL = 1024


def capture_params(into: dict):
    """A context in which every TorchScript export fills `into` with its (folded) parameters by name
    and runs its ONNX shape inference without the weights' values. Raises LookupError now (not on
    entering) when this PyTorch has nothing to wrap."""
    return _capture(_exporter_module(), into)


@contextlib.contextmanager
def _capture(utils, into: dict):
    import torch

    original, infer = utils._model_to_graph, torch._C._jit_pass_onnx_graph_shape_type_inference

    def wrapped(*args, **kwargs):
        graph, params, out = original(*args, **kwargs)
        into.clear()
        into.update(params)
        return graph, params, out

    def infer_without_weights(graph, params, opset):
        # The pass builds an ONNX proto per node with its parameters' values in it, 1.75 GB at its
        # peak for the 0.5B LLM; a weight's shape and dtype are already on its graph input, and
        # values matter only to shape-computing constants (integer, small), which stay.
        infer(graph, {k: v for k, v in params.items() if not _is_weight(v)}, opset)

    utils._model_to_graph = wrapped
    torch._C._jit_pass_onnx_graph_shape_type_inference = infer_without_weights
    try:
        yield into
    finally:
        utils._model_to_graph = original
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


def _is_weight(t) -> bool:
    return t.is_floating_point() and t.numel() >= WEIGHT_MIN_NUMEL


def _exporter_module():
    import importlib

    # torch >= 2.9 keeps the TorchScript exporter here; before, in torch.onnx.utils.
    for name in ("torch.onnx._internal.torchscript_exporter.utils", "torch.onnx.utils"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "_model_to_graph"):
            return module
    raise LookupError("this PyTorch's TorchScript exporter has no _model_to_graph to wrap")


WEIGHT_T = "weight_t"


@contextlib.contextmanager
def linear_views(module):
    """While active, every nn.Linear in `module` computes x @ W^T through a buffer `weight_t` that is
    a view of its weight (persistent, because the tracer takes a module's state from its state_dict;
    a tensor outside it would be inlined as a constant)."""
    import types

    from torch import nn

    patched = [m for m in module.modules() if isinstance(m, nn.Linear) and not hasattr(m, WEIGHT_T)]
    for m in patched:
        m.register_buffer(WEIGHT_T, m.weight.detach().t())
        m.forward = types.MethodType(_linear_t, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
            del m._buffers[WEIGHT_T]


def _linear_t(self, x):
    y = x.matmul(self.weight_t)
    return y if self.bias is None else y + self.bias


def append_tensor(f, tensor, arr, location: str, offset: int) -> int:
    """Write `arr`'s bytes to the open data file `f` at the next page-aligned offset and point
    `tensor` at them (it must hold no data of its own). Returns the offset after them."""
    import onnx

    pad = -offset % ALIGN
    f.write(b"\0" * pad)
    offset += pad
    f.write(memoryview(arr).cast("B") if arr.size else b"")
    # onnx's set_external_data wants the bytes in raw_data first; they never are here.
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", arr.nbytes)):
        tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return offset + arr.nbytes


def external_ref(tensor) -> tuple[str, int, int] | None:
    """(location, offset, length) of an initializer kept in external data, else None."""
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    ref = {e.key: e.value for e in tensor.external_data}
    return ref["location"], int(ref.get("offset", 0)), int(ref.get("length", 0))


def attach_external(path: Path, params: dict) -> int:
    """Move the graph inputs of `path` that are exported parameters into initializers stored in
    `path.name + ".data"`. Returns the bytes written. The graph file is rewritten in place."""
    import numpy as np
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    names = [i.name for i in graph.input if i.name in params]
    data_name = path.name + ".data"
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for name in names:
            arr = np.ascontiguousarray(params[name].detach().cpu().numpy())
            tensor = onnx.TensorProto(name=name, dims=arr.shape,
                                      data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))
            offset = append_tensor(f, tensor, arr, data_name, offset)
            graph.initializer.append(tensor)
    keep = [i for i in graph.input if i.name not in params]
    del graph.input[:]
    graph.input.extend(keep)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    log.info("%s: %d weights (%.2f GB) written to %s", path.name, len(names), offset / 1e9, data_name)
    return offset


def release_freed_memory() -> None:
    """Hand memory freed by the exporter back to the OS (glibc keeps freed heap for reuse, which
    counts in RSS). A no-op where libc has no malloc_trim."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # the trace leaves reference cycles holding activations
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def param_bytes(module) -> int:
    """fp32-equivalent bytes of a module's parameters and buffers (tied ones counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
