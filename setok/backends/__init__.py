"""Backends, one package per framework (Polygraphy's backend/<framework> layout): each has a
loader (session / engine) and a runner behind the `Backend` protocol of `base.py`.

- `onnxrt/`: ONNX Runtime sessions, the I/O-binding KV decoder, the cluster custom op.
- `trt/`: TensorRT build, profiles, engines manifest, runner, lint and its op table.

No torch here; onnxruntime, tensorrt and cuda are imported where a session or engine is made.
"""
