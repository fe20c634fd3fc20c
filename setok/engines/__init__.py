"""TensorRT engines from a bundle: optimization profiles, the build, and the engines manifest.

profiles (pure): (min, opt, max) shapes per stage input, profile selection, output buffer sizes.
manifest (pure): engines.json and the TensorRT-version / GPU compatibility check.
build: `build_engines(bundle, out, ...)`; tensorrt is imported only when a build starts.
The runtime side is setok.runtime.trt.TrtBackend. Importing this package imports no tensorrt.
"""

from setok.engines.build import build_engines
from setok.engines.manifest import (
    ENGINES_MANIFEST,
    EngineEntry,
    EnginesManifest,
    check_compatible,
    load_engines_manifest,
)
from setok.engines.profiles import (
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
