"""The torch-free runtime: `Pipeline.open(BUNDLE)` chains the exported stages (ONNX Runtime on CPU
by default). Importing this package never imports torch."""

from setok.runtime.frame import FrameMap
from setok.runtime.pipeline import Image, ImageInput, Mask, Pipeline, Text, Tokens
from setok.runtime.sampling import SamplingParams

__all__ = ["FrameMap", "Image", "ImageInput", "Mask", "Pipeline", "SamplingParams", "Text", "Tokens"]
