"""ONNX Runtime: one session per stage (`session.py`), the KV-cache decoder kept in ORT through
I/O binding (`decoder.py`), the plugin-form cluster as an onnxruntime-extensions op (`custom_op.py`)."""
