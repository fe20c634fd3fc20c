"""Triton Python-backend model that runs one stage's ONNX graph with ONNX Runtime.

`setok.serve.export_triton(..., stage_backend="python")` copies this file verbatim to
`<repo>/<stage>/1/model.py`, beside `model.onnx`: for a tritonserver that has the Python backend
only (PyPI's `nvidia-pytriton` wheel), where the stock onnxruntime backend is absent. Inputs and
outputs are the stage's, by name, as its config.pbtxt declares them. No torch, no setok.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:  # only inside the Triton Python backend; the module still imports elsewhere
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.outputs = [o["name"] for o in config["output"]]
        path = Path(__file__).resolve().parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def execute(self, requests: list) -> list:
        return [self._one(r) for r in requests]

    def _one(self, request):
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
        try:
            values = self.session.run(self.outputs, feeds)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's message goes back as this request's error
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(v)) for name, v in zip(self.outputs, values)])

    def finalize(self) -> None:
        self.session = None
