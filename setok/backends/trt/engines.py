"""`engines.json`: what `setok build` produced, for which TensorRT and GPU, from which bundle.

An engine plan is tied to the TensorRT version and the GPU architecture it was built on, so the
runtime checks both (check_compatible) before deserializing anything: a mismatch is a one-line
"rebuild" message instead of a crash deep in TensorRT. No TensorRT import here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setok import fields as F
from setok import manifest as M
from setok.backends.trt.profiles import Profile
from setok.errors import BundleError
from setok.io import write_json
from setok.manifest import KvCache, TensorSpec, inside, read_versioned_json, sha256

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENGINES_MANIFEST = "engines.json"
PLUGIN_MODULE = "setok.plugins.trt_plugin"
# Version-compatible engines may cross these major versions (TensorRT support matrix, 11.x:
# "TensorRT 10 version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8
# version-compatible engines can run with a TensorRT 10 runtime").
CROSS_MAJOR = {(8, 10), (10, 11)}


class EnginesError(BundleError):
    """An engines directory that is missing files, tampered with, or built for another machine."""


# ---- engines.json, field by field (the specs of setok.manifest) ---------------------------------
PROFILE_SHAPES = F.Record({k: (F.ListOf(F.integer(0)), True) for k in ("min", "opt", "max")},
                          what="an object {min, opt, max} of shapes (lists of integers >= 0)")
ENGINE_INPUT = F.Record({**M.TENSOR.fields, "profiles": (F.ListOf(PROFILE_SHAPES, 1), True)},
                        what="a tensor record {name, dtype, shape, profiles}")
MODULE = F.Scalar("a Python module name (dotted identifiers)",
                  lambda v: isinstance(v, str) and bool(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", v)))
PLUGIN = F.Record({"id": (F.NAME, True), "module": (MODULE, False), "library": (F.NAME, False), "impl": (F.NAME, False)})
VERSION = F.Scalar('a TensorRT version string such as "10.8.0.43"', lambda v: isinstance(v, str) and bool(re.search(r"\d", v)))
ENGINE = F.Record({
    "stage": (F.NAME, True), "file": (F.NAME, True), "sha256": (F.SHA256, True), "source": (F.NAME, True),
    "precision": (F.NAME, True), "plugin": (F.Nullable(PLUGIN), False), "profiles": (F.ListOf(F.NAME, 1), True),
    "inputs": (F.ListOf(ENGINE_INPUT, 1), True), "outputs": (F.ListOf(M.TENSOR, 1), True),
    "kv_cache": (M.KV_CACHE, False),
}, what="an engine record {stage, file, sha256, source, precision, profiles, inputs, outputs}")
ENGINES = F.Record({
    "setok_version": (M.TEXT, False), "tensorrt_version": (VERSION, True),
    "gpu": (F.Record({"name": (F.NAME, True), "compute_capability": (F.ListOf(F.integer(0), 2, 2), True)}), True),
    "precision": (F.NAME, True), "version_compatible": (M.BOOLEAN, False),
    "bundle": (F.Record({"manifest_sha256": (F.SHA256, True)}), True), "timing_cache": (F.Nullable(M.TEXT), False),
    "engines": (F.ListOf(M.ANY_OBJECT, 1, what="a non-empty list of engine records"), True),
    "extra": (M.ANY_OBJECT, False),
})


def check_engines(d: dict[str, Any]) -> None:
    """FieldError for the first field of engines.json that is not what the TensorRT runner expects."""
    ENGINES(d, "")
    paths = M.named_items(d["engines"], "engines", "stage", ENGINE, "a stage no other engine serves")
    for e in d["engines"]:
        where, names = paths[e["stage"]], e["profiles"]
        if len(set(names)) != len(names):
            raise F.FieldError(F.at(where, "profiles"), "profile names that differ", names)
        kv = e.get("kv_cache")
        if kv is not None and len(kv["past"]) != len(kv["present"]):
            raise F.FieldError(F.at(F.at(where, "kv_cache"), "present"),
                               f"as many names as kv_cache.past has ({len(kv['past'])})", kv["present"])
        if e.get("plugin") and not (e["plugin"].get("module") or e["plugin"].get("library") or e["plugin"].get("impl") == "aot"):
            raise F.FieldError(F.at(where, "plugin"), 'a plugin with a "module" or a "library" to load, or "impl": "aot"',
                               e["plugin"])
        for j, t in enumerate(e["inputs"]):
            _check_profiles(t, names, F.at(F.at(where, "inputs"), j))


def _check_profiles(t: dict[str, Any], names: list[str], where: str) -> None:
    """One (min, opt, max) per profile, each of the tensor's rank, min <= opt <= max, fixed dims kept."""
    if len(t["profiles"]) != len(names):
        raise F.FieldError(F.at(where, "profiles"), f"one {{min, opt, max}} per profile ({len(names)}: {names})",
                           t["profiles"])
    for k, p in enumerate(t["profiles"]):
        here = F.at(F.at(where, "profiles"), k)
        for point in ("min", "opt", "max"):
            if len(p[point]) != len(t["shape"]):
                raise F.FieldError(F.at(here, point), f"a shape of rank {len(t['shape'])} like the tensor's {t['shape']}",
                                   p[point])
        for axis, (d, lo, opt, hi) in enumerate(zip(t["shape"], p["min"], p["opt"], p["max"])):
            if not lo <= opt <= hi or (isinstance(d, int) and not lo == opt == hi == d):
                want = f"min = opt = max = {d} (a fixed dim)" if isinstance(d, int) else "min <= opt <= max"
                raise F.FieldError(here, f"{want} at axis {axis}", p)


@dataclass
class EngineEntry:
    stage: str  # the bundle stage it serves ("cluster" also when built from cluster_plugin.onnx)
    file: str
    sha256: str
    source: str  # the ONNX file of the bundle it was built from
    precision: str  # what the engine computes in: fp32, fp16, int8
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profiles: list[Profile]
    plugin: dict[str, str] | None = None  # {"id", "module"} or {"id", "library"}: load before deserializing
    kv: dict[str, list[str]] | None = None  # the bundle entry's kv_cache record (llm)

    @property
    def kv_cache(self) -> KvCache:
        return KvCache.of(self.inputs, {"kv_cache": self.kv} if self.kv else {})

    def to_dict(self) -> dict[str, Any]:
        ins = [{**t.to_dict(), "profiles": [_mom(p, t.name) for p in self.profiles]} for t in self.inputs]
        return {"stage": self.stage, "file": self.file, "sha256": self.sha256, "source": self.source,
                "precision": self.precision, "plugin": self.plugin, "profiles": [p.name for p in self.profiles],
                "inputs": ins, "outputs": [t.to_dict() for t in self.outputs], **({"kv_cache": self.kv} if self.kv else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineEntry:
        names = list(d["profiles"])
        ins = [TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in d["inputs"]]
        profiles = [Profile(name, {t["name"]: tuple(tuple(t["profiles"][i][k]) for k in ("min", "opt", "max"))
                                   for t in d["inputs"]}) for i, name in enumerate(names)]
        return cls(d["stage"], d["file"], d["sha256"], d["source"], d["precision"], ins,
                   [TensorSpec(**t) for t in d["outputs"]], profiles, d.get("plugin"), d.get("kv_cache"))


def _mom(profile: Profile, name: str) -> dict[str, list[int]]:
    lo, opt, hi = profile.shapes[name]
    return {"min": list(lo), "opt": list(opt), "max": list(hi)}


@dataclass
class EnginesManifest:
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str  # what was asked for; each engine says what it got
    bundle_manifest_sha256: str
    engines: list[EngineEntry]
    version_compatible: bool = False
    setok_version: str = ""
    timing_cache: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def engine(self, stage: str) -> EngineEntry:
        for e in self.engines:
            if e.stage == stage:
                return e
        raise EnginesError(f"engines have no stage {stage!r}; they have {[e.stage for e in self.engines]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "setok_version": self.setok_version,
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": list(self.compute_capability)},
            "precision": self.precision, "version_compatible": self.version_compatible,
            "bundle": {"manifest_sha256": self.bundle_manifest_sha256}, "timing_cache": self.timing_cache,
            "engines": [e.to_dict() for e in self.engines], "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnginesManifest:
        gpu = d["gpu"]
        return cls(str(d["tensorrt_version"]), gpu["name"], tuple(int(x) for x in gpu["compute_capability"]),
                   d["precision"], d["bundle"]["manifest_sha256"], [EngineEntry.from_dict(e) for e in d["engines"]],
                   bool(d.get("version_compatible", False)), d.get("setok_version", ""), d.get("timing_cache"),
                   int(d["schema_version"]), d.get("extra", {}))

    def write(self, folder: Path) -> Path:
        path = Path(folder) / ENGINES_MANIFEST
        write_json(path, self.to_dict())
        return path


def load_engines_manifest(folder: str | Path, verify: bool = True) -> EnginesManifest:
    folder = Path(folder)
    path = folder / ENGINES_MANIFEST
    fix = "rebuild with `setok build`"
    d = read_versioned_json(path, SCHEMA_VERSION, EnginesError, "a directory written by `setok build`", fix)
    M.checked(path, EnginesError, fix, check_engines, d)
    m = EnginesManifest.from_dict(d)
    if verify:
        verify_engines(folder, m)
    return m


def verify_engines(folder: Path, m: EnginesManifest) -> None:
    for e in m.engines:
        path = inside(folder, e.file)
        if not path.is_file():
            raise EnginesError(f"{folder}: {e.file} is missing; {ENGINES_MANIFEST} lists it")
        if sha256(path) != e.sha256:
            raise EnginesError(f"{folder}: {e.file} has sha256 {sha256(path)[:12]}..., {ENGINES_MANIFEST} says "
                               f"{e.sha256[:12]}...; refusing a modified engine")


def parse_version(v: str) -> tuple[int, ...]:
    """'10.8.0.43' -> (10, 8, 0, 43); suffixes such as 'post1' or 'rc' are dropped."""
    nums = re.findall(r"\d+", str(v).split("+")[0])
    if not nums:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(n) for n in nums[:4])


def versions_compatible(built: str, running: str, version_compatible: bool) -> bool:
    """May an engine built with TensorRT `built` run on TensorRT `running`?

    Default engines: only with the TensorRT that built them (compared to major.minor.patch; the
    fourth field is the build number). Version-compatible engines (BuilderFlag.VERSION_COMPATIBLE,
    TensorRT >= 8.6): on the same or any *later* runtime of the same major version, plus the two
    documented cross-major pairs (8 -> 10, 10 -> 11); never on an older runtime.
    """
    b, r = parse_version(built), parse_version(running)
    if not version_compatible:
        return b[:3] == r[:3]
    if r[:3] < b[:3] or b[:2] < (8, 6):
        return False
    return b[0] == r[0] or (b[0], r[0]) in CROSS_MAJOR


def check_compatible(m: EnginesManifest, trt_version: str, gpu_cc: tuple[int, int], gpu_name: str) -> None:
    """InputError unless these engines can run on this TensorRT and GPU.

    The compute capability must match exactly: the engines are not built with a hardware
    compatibility level, and version compatibility says nothing about the GPU. The same
    capability on another GPU model runs but TensorRT warns its tactics may be slow: we log it.
    """
    cc = tuple(int(x) for x in gpu_cc)
    if not versions_compatible(m.tensorrt_version, trt_version, m.version_compatible) or cc != tuple(m.compute_capability):
        a, b = m.compute_capability
        vc = " (version-compatible)" if m.version_compatible else ""
        raise EnginesError(f"engines were built with TensorRT {m.tensorrt_version}{vc} for {m.gpu_name} (sm_{a}{b}); "
                           f"this machine has TensorRT {trt_version} / sm_{cc[0]}{cc[1]} ({gpu_name}): "
                           "rebuild with `setok build`")
    if gpu_name != m.gpu_name:
        log.warning("engines were built on %s and run on %s (same sm_%d%d): fine, but the tactics were timed on the other GPU",
                    m.gpu_name, gpu_name, *cc)
