"""The torch-free runtime: `Pipeline.open(BUNDLE)` chains the exported stages (ONNX Runtime on CPU
by default). Importing this package never imports torch."""

from setok.runtime.pipeline import Image, Mask, Pipeline, Text, Tokens

__all__ = ["Image", "Mask", "Pipeline", "Text", "Tokens"]
