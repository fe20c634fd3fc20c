"""`setok export --dtype fp16`: a stage's graph rewritten with float16 weights and compute.

The graph's inputs and outputs stay float32 (a Cast at each edge), so the runtime, the manifest's
specs and TensorRT's bindings are those of the fp32 bundle; inside, TensorRT builds the fp16
graph strongly typed (TensorRT 11 has no FP16 builder flag: the graph's own types decide).
ONNX Runtime's converter (onnxruntime.transformers.float16) does the rewrite; ops it keeps in
float32 (Range, CumSum, TopK, Min/Max, ...) get Casts around them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from setok import manifest as M
from setok.optional import require

log = logging.getLogger(__name__)

HALF = "fp16"


def to_fp16(path: Path) -> Path:
    """Rewrite `path` in place as float16 inside, float32 at its I/O; weights stay beside it in
    an external-data file when the fp32 graph had one."""
    import onnx

    convert = require(("onnxruntime.transformers.float16",), "ONNX Runtime's float16 converter ships with onnxruntime")
    path = Path(path)
    old_data = [path.parent / rel for rel in M.external_data(path)]
    model = onnx.load(str(path))  # the weights too: every float initializer becomes half
    # An inline fp32 graph is under protobuf's 2 GB, so its half is too: only a graph that already
    # keeps its weights outside is large. Shape inference on a > 2 GB proto fails (it serializes
    # the model); the converter then relies on the value_info the exporter already wrote.
    large = bool(old_data)
    half = convert.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
    del model
    for f in old_data:  # read into memory above; the export's temp folder holds this bundle
        f.unlink()
    tmp = path.with_name(path.stem + ".fp16.tmp.onnx")
    if large:
        onnx.save(half, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(half, str(tmp))
    del half
    os.replace(tmp, path)
    log.info("%s: float16 weights and compute, float32 I/O", path.name)
    return path
