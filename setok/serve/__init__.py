"""Serving: export a bundle as a Triton Inference Server model repository. Imports nothing heavy."""

from setok.serve.triton import export_triton

__all__ = ["export_triton"]
