"""`setok export --dtype fp16`: a stage's graph rewritten with float16 weights and compute.

The graph's inputs and outputs stay float32 (a Cast at each edge), so the runtime, the manifest's
specs and TensorRT's bindings are those of the fp32 bundle; inside, TensorRT builds the fp16
graph strongly typed (TensorRT 11 has no FP16 builder flag: the graph's own types decide).
ONNX Runtime's converter (onnxruntime.transformers.float16) does the rewrite; ops it keeps in
float32 (Range, CumSum, TopK, Min/Max, ...) get Casts around them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from setok import manifest as M
from setok.export.external import append_tensor, external_ref
from setok.optional import require

log = logging.getLogger(__name__)

HALF = "fp16"


def to_fp16(path: Path) -> Path:
    """Rewrite `path` in place as float16 inside, float32 at its I/O; weights stay beside it in
    an external-data file when the fp32 graph had one."""
    convert = require(("onnxruntime.transformers.float16",), "ONNX Runtime's float16 converter ships with onnxruntime")
    path = Path(path)
    # An inline fp32 graph is under protobuf's 2 GB, so its half is too: only a graph that already
    # keeps its weights outside is large, and that one is converted without loading its weights.
    if M.external_data(path):
        _half_external(path, convert)
    else:
        _half_inline(path, convert)
    log.info("%s: float16 weights and compute, float32 I/O", path.name)
    return path


def _half_inline(path: Path, convert) -> None:
    import onnx

    half = convert.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    tmp = path.with_name(path.stem + ".fp16.tmp.onnx")
    onnx.save(half, str(tmp))
    os.replace(tmp, path)


@contextlib.contextmanager
def _shapes_from_dims(convert):
    """The converter takes a converted initializer's shape from its values (`to_array(t).shape`),
    which reads external data; its dims say the same without reading a byte."""
    import onnx

    original = convert.make_value_info_from_tensor
    convert.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
    try:
        yield
    finally:
        convert.make_value_info_from_tensor = original


def _half_external(path: Path, convert) -> None:
    """The converter rewrites the graph; an external float initializer it converts only changes its
    type there (it has no bytes in the proto), so the bytes are converted here one tensor at a time,
    with the converter's own clamping, into a new data file. Peak: the graph plus the largest
    tensor, instead of the fp32 and fp16 weights together (+3 GB at the 0.5B LLM). Shape inference
    stays off: it would serialize the model; the exporter's value_info serves instead."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    was_float = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    with _shapes_from_dims(convert):
        half = convert.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    data_name = path.name + ".data"
    tmp_data = path.with_name(data_name + ".fp16.tmp")
    offset, sources = 0, {}
    with open(tmp_data, "wb") as out:
        for t in half.graph.initializer:
            ref = external_ref(t)
            if ref is None:
                continue
            location, start, length = ref
            src = sources.setdefault(location, np.memmap(path.parent / location, np.uint8, "r"))
            raw = src[start:start + length]
            if t.name in was_float and t.data_type == onnx.TensorProto.FLOAT16:
                raw = convert.convert_np_to_float16(raw.view(np.float32))
            offset = append_tensor(out, t, np.ascontiguousarray(raw), data_name, offset)
    old = {path.parent / rel for rel in sources}
    sources.clear()  # close the maps before the files go
    tmp = path.with_name(path.stem + ".fp16.tmp.onnx")
    onnx.save(half, str(tmp))
    for f in old:
        f.unlink()
    os.replace(tmp_data, path.parent / data_name)
    os.replace(tmp, path)
