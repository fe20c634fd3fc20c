"""INT8 post-training calibration: real per-stage inputs -> explicit Q/DQ ONNX + range files."""

from setok.calibration.quantize import calibrate_bundle

__all__ = ["calibrate_bundle"]
