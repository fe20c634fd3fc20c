"""`setok build`: a bundle -> one TensorRT engine per stage + engines.json, written atomically.

Precision, per stage (plan_stage, pure and unit-tested):
- a Q/DQ INT8 stage (from `setok calibrate`) is built as a strongly typed network: the graph's
  Q/DQ nodes say what runs in int8, no precision flags (TensorRT forbids them with strong typing);
- fp16 on TensorRT 10.x: BuilderFlag.FP16 (weak typing). TensorRT 11 removed the precision flags;
  its documented replacement is ModelOpt AutoCast (`modelopt.onnx.autocast.convert_to_mixed_precision`,
  keep_io_types=True) on the ONNX graph, then a strongly typed build;
- int8 for an fp32 graph on TensorRT 10.x with `calibration/<stage>.calib.cache`: BuilderFlag.INT8
  and an IInt8EntropyCalibrator2 that only *reads* that table (get_batch returns None, so TensorRT
  never calibrates here); on TensorRT 11 (no implicit INT8) or without a table: fp32, logged;
- the cluster stage always stays fp32 with TF32 off: its outputs are discrete (argmin ties, the
  tau threshold), so reduced precision changes token ids, not just values.

Everything with TensorRT is written against its documented Python API (TensorRT 10.3 on JetPack 6
for standard-op engines, 10.9+ for the Python AOT plugin, 11.x); tensorrt is not installable on the
development machine. TensorRT 11 networks are always strongly typed: the STRONGLY_TYPED creation flag
is deprecated and ignored there (python/docstrings/infer/pyCoreDoc.h, v11.0), so it is set on 10.x only.

Stages are told apart by what the manifest says of them, never by name: an entry with only
integer outputs is `exact` (kept fp32), an entry that is a `form_of` another stage is one of the
graphs that stage's single engine can be built from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import setok
from setok import manifest as M
from setok.backends.trt.engines import (
    PLUGIN_MODULE,
    EngineEntry,
    EnginesManifest,
    parse_version,
)
from setok.backends.trt.profiles import Limits, Profile, stage_profiles
from setok.errors import InputError, SetokError
from setok.io import atomic_dir, write_bytes
from setok.optional import require, tensorrt
from setok.plugins.versions import TRT_PYTHON_PLUGIN_MIN, version_tuple

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
CLUSTER_FORMS = ("auto", "plugin", "standard")
MODELOPT_MISSING = ("fp16 on TensorRT >= 11 converts the ONNX graphs with ModelOpt AutoCast: "
                    "pip install nvidia-modelopt[onnx]")


class BuildError(SetokError):
    """TensorRT refused a stage (parser errors, no engine): the message names the stage and why."""


# ---- pure decisions (unit-tested without TensorRT) ------------------------------------------
@dataclass(frozen=True)
class StagePlan:
    precision: str  # what the engine computes in
    strongly_typed: bool
    flags: tuple[str, ...] = ()  # trt.BuilderFlag names to set
    clear_flags: tuple[str, ...] = ()  # ... and to clear (when the running TensorRT has them)
    autocast_fp16: bool = False
    calib_cache: Path | None = None
    note: str = ""


def refuse_cpu_only(manifest: M.Manifest) -> None:
    """Dynamically quantized stages (MatMulInteger), MatMulNBits weight-only stages and GroupQueryAttention
    are ONNX Runtime forms TensorRT cannot parse."""
    cpu = [s.name for s in manifest.stages if s.extra.get("quantizer") == "dynamic"]
    if cpu:
        raise InputError(f"stage(s) {cpu} are dynamically quantized (ONNX Runtime CPU INT8, MatMulInteger); TensorRT "
                         "cannot build them: build from the fp32 bundle or one from `setok calibrate --target tensorrt`")
    nbits = [s.name for s in manifest.stages if s.extra.get("weight_form") == ORT_WEIGHT_FORM]
    if nbits:
        raise InputError(f"stage(s) {nbits} have ONNX Runtime's MatMulNBits weight-only form; TensorRT cannot parse it: "
                         "quantize for TensorRT with `setok calibrate --target tensorrt --llm-weights ...` "
                         "(DequantizeLinear -> MatMul) or build from the fp32 bundle")
    fused = [s.name for s in manifest.stages if s.extra.get("attention", M.EAGER_ATTENTION) != M.EAGER_ATTENTION]
    if fused:
        raise InputError(f"stage(s) {fused} use ONNX Runtime's GroupQueryAttention (exported with --llm-attention gqa); "
                         "TensorRT cannot parse it: export the bundle with --llm-attention eager for TensorRT")


ORT_WEIGHT_FORM = "MatMulNBits"
TARGET = "tensorrt"


def other_target(manifest: M.Manifest) -> str:
    """A warning when `setok calibrate` chose the bundle's forms for another target ('' when none):
    ONNX Runtime CPU keeps a stage INT8 only where it is faster there, so INT8 TensorRT would run
    well may have been left float."""
    other = {s.name: s.extra["target"] for s in manifest.stages if s.extra.get("target") not in (None, TARGET)}
    if not other:
        return ""
    targets = ", ".join(sorted(set(other.values())))
    return (f"the bundle was quantized for {targets}, not TensorRT (stages {sorted(other)}): its speed gate kept "
            "stages float that TensorRT would run in INT8; for TensorRT, calibrate with `setok calibrate --target tensorrt`")


def plan_stage(stage: str, graph_precision: str, requested: str, trt_major: int,
               calib_cache: Path | None = None, exact: bool = False) -> StagePlan:
    """`exact`: the stage's outputs are all integers (the clustering's token ids and counts)."""
    strong = trt_major >= 11  # TensorRT 11 networks are always strongly typed (the flag is accepted, ignored)
    if graph_precision in ("int8", "int4"):  # Q/DQ INT8, or weight-only DequantizeLinear(int4|int8) -> MatMul
        note = "" if requested == graph_precision else f"the bundle's {stage} graph is Q/DQ {graph_precision.upper()} and is built as such"
        return StagePlan(graph_precision, True, note=note)
    if graph_precision == "fp16":  # `setok export --dtype fp16`: the graph's own types decide
        note = "" if requested == "fp16" else f"the bundle's {stage} graph is float16 and is built as such"
        return StagePlan("fp16", True, note=note)
    if exact:
        note = "" if requested == "fp32" else f"the {stage} stage stays fp32: its outputs are discrete"
        return StagePlan("fp32", strong, clear_flags=("TF32",), note=note)
    if requested == "fp16":
        return StagePlan("fp16", True, autocast_fp16=True) if strong else StagePlan("fp16", False, flags=("FP16",))
    if requested == "int8":
        if not strong and calib_cache is not None:
            return StagePlan("int8", False, flags=("INT8",), calib_cache=calib_cache)
        why = ("TensorRT >= 11 has no implicit INT8 (calibrate the bundle: `setok calibrate`)" if strong
               else f"the bundle has no calibration/{stage}.calib.cache")
        return StagePlan("fp32", strong, note=f"int8 asked but {why}: built fp32")
    return StagePlan("fp32", strong)


def choose_cluster_form(requested: str, has_plugin_stage: bool, plugin_available: bool, version_compatible: bool) -> str:
    """'plugin' (the custom-op form of a stage, through the TensorRT plugin) or 'standard' (standard ops)."""
    if requested == "standard":
        return "standard"
    if requested == "plugin":
        if not has_plugin_stage:
            raise InputError("cluster_form='plugin': the bundle has no plugin (custom-op) form of a stage; "
                             "use 'standard' or 'auto'")
        return "plugin"
    # auto: the plugin needs tensorrt.plugin with AOT (TensorRT >= 10.9) and Triton at build time. A
    # version-compatible plan runs on a later TensorRT's lean runtime, where a Python plugin's
    # registration is not guaranteed: the standard-op graph carries no such dependency.
    return "plugin" if has_plugin_stage and plugin_available and not version_compatible else "standard"


def engine_stages(manifest: M.Manifest, cluster_form: str) -> list[tuple[str, M.StageEntry]]:
    """(engine stage name, bundle stage entry) pairs: one engine per stage, built from the chosen
    form (the custom-op form with 'plugin', else the standard-op graph)."""
    out = []
    for s in manifest.stages:
        if s.form_of is not None:
            continue
        plugin = [f for f in manifest.forms(s.name) if f.custom_op]
        out.append((s.name, plugin[0] if plugin and cluster_form == "plugin" else s))
    return out


def has_plugin_form(manifest: M.Manifest) -> bool:
    return any(s.form_of is not None and s.custom_op for s in manifest.stages)


def _selected(pairs: list[tuple[str, M.StageEntry]], stages: list[str] | None) -> list[tuple[str, M.StageEntry]]:
    if stages is None:
        return pairs
    unknown = sorted(set(stages) - {n for n, _ in pairs})
    if unknown:
        raise InputError(f"stages {unknown} are not in the bundle; it has {[n for n, _ in pairs]}")
    return [(n, e) for n, e in pairs if n in stages]


def check_args(precision: str, max_batch: int, cluster_form: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}; expected one of {list(PRECISIONS)}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch={max_batch!r}; expected a positive integer")
    if cluster_form not in CLUSTER_FORMS:
        raise InputError(f"cluster_form {cluster_form!r}; expected one of {list(CLUSTER_FORMS)}")


def calib_cache_path(bundle: Path, manifest: M.Manifest, stage: str) -> Path | None:
    """The TensorRT calibration table of a stage, from the manifest's files or the usual place."""
    rel = manifest.files.get(f"calib_table.{stage}", {}).get("file", f"calibration/{stage}.calib.cache")
    path = M.inside(bundle, rel)
    return path if path.is_file() else None


# ---- the build --------------------------------------------------------------------------------
def build_engines(bundle: Path, out: Path, precision: str = "fp32", max_batch: int = 1,
                  timing_cache: Path | None = None, version_compatible: bool = False,
                  cluster_form: str = "auto", stages: list[str] | None = None) -> Path:
    """Build every stage of `bundle` (or only `stages`) into `out`, atomically: the old directory
    survives a failure."""
    check_args(precision, max_batch, cluster_form)
    bundle, out = Path(bundle), Path(out)
    manifest = M.load_manifest(bundle)
    refuse_cpu_only(manifest)
    if warning := other_target(manifest):
        log.warning(warning)
    trt = tensorrt()
    from setok.backends.trt.runner import device_info, trt_logger

    limits = Limits.from_manifest(manifest, max_batch)
    trt_major = parse_version(trt.__version__)[0]
    form = choose_cluster_form(cluster_form, has_plugin_form(manifest), _plugin_available(trt.__version__),
                               version_compatible)
    if form == "plugin":
        from setok.plugins.trt_plugin import register_plugin

        register_plugin()  # the ONNX parser finds the creator in the registry
    pairs = _selected(engine_stages(manifest, form), stages)
    gpu_name, cc = device_info()
    cache = timing_cache.read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    logger = trt_logger()  # one logger per process: TensorRT keeps the first one it is given
    entries = []
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="setok-build-") as work:
        ctx = _Ctx(trt, logger, bundle, manifest, Path(tmp), Path(work), precision, trt_major, version_compatible)
        for name, entry in pairs:
            engine, cache = _build_one(ctx, name, entry, stage_profiles(entry.inputs, limits, name), cache)
            entries.append(engine)
        EnginesManifest(trt.__version__, gpu_name, cc, precision, M.sha256(bundle / M.MANIFEST), entries,
                        version_compatible, setok.__version__, str(timing_cache) if timing_cache else None,
                        extra={"cluster_form": form, "limits": asdict(limits)}).write(tmp)
        copy_bundle_contract(bundle, manifest, Path(tmp) / BUNDLE_DIR)
    if timing_cache:
        write_bytes(Path(timing_cache), cache)
    log.info("engines written to %s", out)
    return out


BUNDLE_DIR = "bundle"  # the source bundle's manifest and non-ONNX files, for the runtime


def copy_bundle_contract(bundle: Path, manifest: M.Manifest, dest: Path) -> None:
    """What the runtime reads besides engines (config, preprocessing, text contract, embeddings,
    tokenizer) travels with the engines, so `Pipeline.open(ENGINES, backend="tensorrt")` works alone."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bundle / M.MANIFEST, dest / M.MANIFEST)
    for f in manifest.files.values():
        target = dest / f["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(M.inside(bundle, f["file"]), target)


@dataclass(frozen=True)
class _Ctx:
    trt: ModuleType
    logger: Any
    bundle: Path
    manifest: M.Manifest
    out: Path
    work: Path
    precision: str
    trt_major: int
    version_compatible: bool


def _build_one(ctx: _Ctx, name: str, entry: M.StageEntry, profiles: list[Profile], cache: bytes) -> tuple[EngineEntry, bytes]:
    """Build one stage into ctx.out; (its engines.json entry, the updated timing cache)."""
    plan = plan_stage(name, entry.precision, ctx.precision, ctx.trt_major,
                      calib_cache_path(ctx.bundle, ctx.manifest, entry.name), entry.exact)
    if plan.note:
        log.warning("stage %s: %s", name, plan.note)
    src = M.inside(ctx.bundle, entry.file)
    if plan.autocast_fp16:
        src = autocast_fp16(src, ctx.work / f"{name}.fp16.onnx")
    log.info("building %s (%s) from %s", name, plan.precision, entry.file)
    engine, cache = build_stage(ctx.trt, ctx.logger, name, src, plan, profiles, cache, ctx.version_compatible)
    file = f"{name}.engine"
    (ctx.out / file).write_bytes(engine)
    # An AOT plugin's kernel is inside the engine: no Python is needed to run it (NVIDIA/TensorRT
    # samples/python/quickly_deployable_plugins/README.md, "Loading and running a TRT engine containing an AOT plugin").
    plugin = {"id": entry.custom_op, "module": PLUGIN_MODULE, "impl": "aot"} if entry.custom_op else None
    kv = entry.kv_cache.to_dict() if entry.kv_cache.past else None
    return EngineEntry(name, file, M.sha256(ctx.out / file), entry.file, plan.precision, entry.inputs, entry.outputs,
                       profiles, plugin, kv), cache


def build_stage(trt: ModuleType, logger: Any, name: str, onnx_path: Path, plan: StagePlan, profiles: list[Profile],
                cache: bytes, version_compatible: bool) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) of one stage; BuildError naming the stage on failure."""
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve next to it
        raise BuildError(f"stage {name}: TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(_parser_errors(parser)))
    config = builder.create_builder_config()
    _apply_flags(trt, config, plan, version_compatible)
    _add_profiles(builder, network, config, profiles, name)
    timing = _timing_cache(config, cache, name)
    calibrator = None
    if plan.calib_cache is not None:
        calibrator = cache_calibrator(trt, plan.calib_cache.read_bytes())
        config.int8_calibrator = calibrator  # kept referenced until the build returns
    logger.errors.clear()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"stage {name}: TensorRT built no engine: " + "; ".join(logger.errors or ["no error was logged"]))
    del calibrator
    return bytes(memoryview(serialized)), bytes(memoryview(timing.serialize()))


def network_flags(trt: ModuleType, plan: StagePlan) -> int:
    """STRONGLY_TYPED where TensorRT < 11 reads it; PREFER_AOT_PYTHON_PLUGINS where it exists (>= 10.9).
    The plugin node's own `aot` attribute already decides (it overrides the flags); the flag covers
    nodes written without it."""
    F = trt.NetworkDefinitionCreationFlag
    flags = 0
    if plan.strongly_typed and version_tuple(trt.__version__)[0] < 11:
        flags |= 1 << int(F.STRONGLY_TYPED)
    if hasattr(F, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(F.PREFER_AOT_PYTHON_PLUGINS)
    return flags


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = getattr(e, "node_name", lambda: "")() or e.node()
        errors.append(f"{e.desc()} (node {node}, {e.code()})")
    return errors or ["no error was reported"]


def _apply_flags(trt: ModuleType, config: Any, plan: StagePlan, version_compatible: bool) -> None:
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _add_profiles(builder: Any, network: Any, config: Any, profiles: list[Profile], name: str) -> None:
    """One TensorRT optimization profile per Profile, over the network's dynamic inputs."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    if profiles and names != set(profiles[0].shapes):
        raise BuildError(f"stage {name}: the ONNX graph's inputs {sorted(names)} are not the manifest's {sorted(profiles[0].shapes)}")
    dynamic = [t.name for t in inputs if any(d < 0 for d in t.shape)]
    if not dynamic:
        return  # a static network needs no profile
    for p in profiles:
        op = builder.create_optimization_profile()
        for t in dynamic:
            op.set_shape(t, *p.shapes[t])
        if config.add_optimization_profile(op) < 0:
            raise BuildError(f"stage {name}: TensorRT rejected optimization profile {p.name!r} {p.to_dict()['shapes']}")


def _timing_cache(config: Any, cache: bytes, name: str) -> Any:
    timing = config.create_timing_cache(cache)
    if timing is None:
        raise BuildError(f"stage {name}: TensorRT could not create a timing cache")
    if not config.set_timing_cache(timing, False):  # ignore_mismatch=False: never reuse another GPU's timings
        log.warning("stage %s: the timing cache is from another GPU or TensorRT; starting a fresh one", name)
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
    return timing


def cache_calibrator(trt: ModuleType, table: bytes) -> Any:
    """An IInt8EntropyCalibrator2 that only reads a calibration table (TensorRT 10.x implicit INT8)."""

    class TableCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # no data: TensorRT must take every scale from the table

        def read_calibration_cache(self) -> bytes:
            return table

        def write_calibration_cache(self, cache: Any) -> None:
            pass  # the table is the bundle's; never overwritten here

    return TableCalibrator()


def autocast_fp16(src: Path, dst: Path) -> Path:
    """TensorRT >= 11: the ONNX graph in mixed fp16 through ModelOpt AutoCast, fp32 I/O kept."""
    autocast = require("modelopt.onnx.autocast", MODELOPT_MISSING)
    import onnx

    model = autocast.convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1_800_000_000)
    return dst


def _plugin_available(trt_version: str) -> bool:
    """The Python AOT plugin can be built here: TensorRT >= 10.9 with tensorrt.plugin (not in
    tensorrt-lean), and Triton (the plugin's kernels)."""
    if version_tuple(trt_version)[:2] < TRT_PYTHON_PLUGIN_MIN:
        return False
    with contextlib.suppress(ImportError, ValueError):
        return importlib.util.find_spec("tensorrt.plugin") is not None and importlib.util.find_spec("triton") is not None
    return False
