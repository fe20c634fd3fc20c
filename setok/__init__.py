"""setok: a semantic vision tokenizer (SeTok / Setokim) from PyTorch to ONNX, INT8 and TensorRT.

Importing the package is cheap: nothing heavy (torch, onnxruntime, tensorrt) is imported here.
"""

__version__ = "0.1.0"

from setok.errors import SetokError

__all__ = ["SetokError", "__version__"]
