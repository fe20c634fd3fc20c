"""TensorRT: build engines from a bundle, and run them (one engine per stage).

profiles (pure): (min, opt, max) shapes per stage input, profile selection, output buffer sizes.
engines (pure): engines.json and the TensorRT-version / GPU compatibility check.
build: `build_engines(bundle, out, ...)`; tensorrt is imported only when a build starts.
runner: `TrtBackend` / `TrtDecoder` (cuda-python buffers, streams, the device-resident KV cache).
lint: the bundle's graphs against TensorRT's ONNX operator table (`trt_onnx_ops.json`).
Importing this package imports no tensorrt and no cuda.
"""

from setok.backends.trt.build import build_engines
from setok.backends.trt.engines import (
    ENGINES_MANIFEST,
    EngineEntry,
    EnginesManifest,
    check_compatible,
    load_engines_manifest,
)
from setok.backends.trt.profiles import (
    Limits,
    Profile,
    buffer_plan,
    select_profile,
    stage_profiles,
)

__all__ = [
    "ENGINES_MANIFEST", "EngineEntry", "EnginesManifest", "Limits", "Profile", "buffer_plan", "build_engines",
    "check_compatible", "load_engines_manifest", "select_profile", "stage_profiles",
]
