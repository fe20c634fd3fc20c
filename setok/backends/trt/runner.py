"""The TensorRT backend: one engine per stage behind the same Backend protocol as ONNX Runtime.

cuda-python (no torch) for device memory and the stream; name-based I/O (set_tensor_address,
set_input_shape, execute_async_v3), the TensorRT >= 10 API. Importing this module imports neither
tensorrt nor cuda: both load on first use, with an install hint when missing.

Written against TensorRT's and cuda-python's documented Python APIs; TensorRT is not installable on
the development machine, so only the pure parts (profiles, manifest) are exercised there.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from setok import manifest as M
from setok.backends.base import StageIO
from setok.backends.decode import HostDecoder, position_feeds
from setok.backends.trt.engines import (
    EngineEntry,
    check_compatible,
    load_engines_manifest,
)
from setok.backends.trt.profiles import (
    KvPlan,
    buffer_plan,
    last_row_offset,
    resolve_dims,
    resolve_shape,
    select_profile,
)
from setok.errors import InputError
from setok.manifest import inside
from setok.optional import require, tensorrt

log = logging.getLogger(__name__)

CUDA_MISSING = "cuda-python is needed for the TensorRT backend: pip install 'setok[gpu]' (cuda-python >= 12.6)"
MIN_ALLOC = 256  # TensorRT wants 256-byte aligned, non-null addresses, also for empty tensors (a 0-length past)


class TrtError(RuntimeError):
    """TensorRT or CUDA reported a failure at run time (not a user mistake: keep the traceback)."""


def cudart() -> ModuleType:
    """cuda-python's runtime module: `cuda.bindings.runtime` (>= 12.6), else the older `cuda.cudart`."""
    return require(("cuda.bindings.runtime", "cuda.cudart"), CUDA_MISSING)


def cuda_call(result: Any, what: str) -> Any:
    """cuda-python returns (error, *values): raise on error (naming `what`), return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        raise TrtError(f"{what} failed: {getattr(err, 'name', err)} ({msg.decode() if isinstance(msg, bytes) else msg})")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


_LOGGER: Any = None


def trt_logger() -> Any:
    """The process's one TensorRT logger (builds and runtimes share it: TensorRT keeps the first logger
    it is given and warns when another appears), routed into `logging`; it keeps the errors so a
    failed build can quote them."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _collecting_logger(tensorrt())
    return _LOGGER


def _collecting_logger(trt: ModuleType) -> Any:
    S = trt.ILogger.Severity
    levels = {S.INTERNAL_ERROR: logging.CRITICAL, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING,
              S.INFO: logging.INFO, S.VERBOSE: logging.DEBUG}

    class Collecting(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

    return Collecting()


def device_info(device: int | None = None) -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of the current (or given) CUDA device."""
    rt = cudart()
    dev = cuda_call(rt.cudaGetDevice(), "cudaGetDevice") if device is None else device
    prop = cuda_call(rt.cudaGetDeviceProperties(dev), f"cudaGetDeviceProperties({dev})")
    name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name, (int(prop.major), int(prop.minor))


class DeviceBuffer:
    """One cudaMalloc allocation that grows (never shrinks) to the largest request."""

    def __init__(self, rt: ModuleType, what: str):
        self.rt, self.what, self.ptr, self.nbytes = rt, what, 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes or not self.ptr:
            self.free()
            size = max(MIN_ALLOC, nbytes)
            self.ptr = int(cuda_call(self.rt.cudaMalloc(size), f"cudaMalloc({size}) for {self.what}"))
            self.nbytes = size
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            cuda_call(self.rt.cudaFree(self.ptr), f"cudaFree for {self.what}")
        self.ptr, self.nbytes = 0, 0


class TrtBackend(StageIO):
    """One TensorRT engine for one stage (the Backend protocol: inputs / outputs / run / close)."""

    def __init__(self, engine_path: str | Path, entry: EngineEntry, stream: int | None = None,
                 version_compatible: bool = False):
        trt, self.rt = tensorrt(), cudart()
        super().__init__(entry.stage, entry.inputs, entry.outputs)
        self.entry = entry
        _load_plugin(entry)
        self._runtime = trt.Runtime(trt_logger())
        if version_compatible:
            # A version-compatible plan embeds a lean runtime (host code): TensorRT refuses it unless
            # allowed. We only load plans listed, with their sha256, in engines.json.
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TrtError(f"stage {self.stage}: TensorRT could not deserialize {engine_path} (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtError(f"stage {self.stage}: could not create an execution context (out of GPU memory?)")
        self._check_io(trt)
        self._own_stream = stream is None
        self.stream = int(cuda_call(self.rt.cudaStreamCreate(), "cudaStreamCreate")) if stream is None else int(stream)
        self._buffers = {n: DeviceBuffer(self.rt, f"stage {self.stage} tensor {n}") for n in [*self._inputs, *self._outputs]}
        self._profile: int | None = None
        # One execution context and one set of buffers: calls from several threads take turns.
        self._lock = threading.Lock()
        self._kv_pool: list[list[dict[str, DeviceBuffer]]] = []  # KV buffer pairs of finished decoders

    def _check_io(self, trt: ModuleType) -> None:
        """The engine's tensors must be the manifest's, by name, mode and dtype."""
        io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            io[name] = (self.engine.get_tensor_mode(name), np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))))
        want = {n: (trt.TensorIOMode.INPUT, np.dtype(s.dtype)) for n, s in self._inputs.items()}
        want |= {n: (trt.TensorIOMode.OUTPUT, np.dtype(s.dtype)) for n, s in self._outputs.items()}
        if io != want:
            raise TrtError(f"stage {self.stage}: engine I/O {sorted((n, str(d)) for n, (_, d) in io.items())} "
                           f"does not match engines.json {sorted((n, str(d)) for n, (_, d) in want.items())}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        with self._lock:
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        self._use_profile(select_profile(self.entry.profiles, shapes, self.stage))
        hosts = {n: np.ascontiguousarray(a) for n, a in feeds.items()}  # alive until the stream syncs
        for name, arr in hosts.items():
            self._bind_input(name, arr)
        outs = self._bind_outputs(resolve_dims(list(self._inputs.values()), shapes))
        self._execute()
        for name, arr in outs.items():
            self._copy(arr.ctypes.data, self._buffers[name].ptr, arr.nbytes, "DeviceToHost", name)
        cuda_call(self.rt.cudaStreamSynchronize(self.stream), f"cudaStreamSynchronize after stage {self.stage}")
        return outs

    def _use_profile(self, index: int) -> None:
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self.stream):
                raise TrtError(f"stage {self.stage}: set_optimization_profile_async({index}) failed")
            self._profile = index

    def _bind_input(self, name: str, arr: np.ndarray) -> None:
        ptr = self._buffers[name].reserve(arr.nbytes)
        if arr.nbytes:
            self._copy(ptr, arr.ctypes.data, arr.nbytes, "HostToDevice", name)
        if not self.context.set_input_shape(name, arr.shape):
            raise TrtError(f"stage {self.stage}: set_input_shape({name}, {list(arr.shape)}) was refused")
        if not self.context.set_tensor_address(name, ptr):
            raise TrtError(f"stage {self.stage}: set_tensor_address({name}) was refused")

    def _bind_outputs(self, dims: dict[str, int], device: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Host arrays for the outputs; device buffers sized by the manifest, shapes checked against TensorRT.
        Outputs named in `device` are written to that address instead and get no host array."""
        plan = buffer_plan(list(self._outputs.values()), dims)
        device = device or {}
        outs = {}
        for name, spec in self._outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            want = resolve_shape(spec, dims)
            if shape != want:  # a manifest/engine disagreement, or a data-dependent shape (-1)
                raise TrtError(f"stage {self.stage}: output {name} has shape {list(shape)} in TensorRT, "
                               f"{list(want)} by engines.json")
            ptr = device[name] if name in device else self._buffers[name].reserve(plan[name])
            if not self.context.set_tensor_address(name, ptr):
                raise TrtError(f"stage {self.stage}: set_tensor_address({name}) was refused")
            if name not in device:
                outs[name] = np.empty(shape, np.dtype(spec.dtype))
        return outs

    def _bind_device_input(self, name: str, ptr: int, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise TrtError(f"stage {self.stage}: set_input_shape({name}, {list(shape)}) was refused")
        if not self.context.set_tensor_address(name, ptr):
            raise TrtError(f"stage {self.stage}: set_tensor_address({name}) was refused")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise TrtError(f"stage {self.stage}: execute_async_v3 failed (see the TensorRT log above)")

    def decoder(self, batch: int = 1) -> TrtDecoder | HostDecoder:
        """The llm stage's KV-cache decoder: the cache stays in device memory between steps. The
        device-resident decoder is batch-1; batches take the host-cache loop."""
        return TrtDecoder(self) if batch == 1 else HostDecoder(self, self.entry)

    def _copy(self, dst: int, src: int, nbytes: int, kind: str, name: str) -> None:
        if not nbytes:
            return
        k = getattr(self.rt.cudaMemcpyKind, f"cudaMemcpy{kind}")
        cuda_call(self.rt.cudaMemcpyAsync(dst, src, nbytes, k, self.stream),
                  f"cudaMemcpyAsync {kind} of stage {self.stage} tensor {name}")

    def close(self) -> None:
        if getattr(self, "_buffers", None) is None:
            return
        for buf in [*self._buffers.values(), *(b for pair in self._kv_pool for s in pair for b in s.values())]:
            buf.free()
        self._buffers, self._kv_pool = None, []
        self.context = self.engine = None  # the context before the engine, the engine before the runtime
        if self._own_stream:
            cuda_call(self.rt.cudaStreamDestroy(self.stream), f"cudaStreamDestroy of stage {self.stage}")

    def __del__(self) -> None:  # best effort: a failing free at interpreter exit must not raise
        try:
            self.close()
        except Exception as e:  # noqa: BLE001
            log.debug("stage %s: cleanup at exit failed: %s", getattr(self, "stage", "?"), e)


class TrtDecoder:
    """Greedy/sampled decoding with a device-resident KV cache.

    Two device buffer sets, each sized once for the longest cache (`KvPlan`): step t reads the past
    from one set and writes the presents (past + this step, the graph's Concat) into the other, then
    they swap. Per step only the new token's embedding, the mask and positions go up, and only the
    last row of logits and hidden state comes back.
    """

    def __init__(self, backend: TrtBackend):
        self.b = backend
        self.plan = KvPlan.from_entry(backend.entry)
        with backend._lock:  # a finished decoder's buffers are reused: no cudaMalloc per answer
            self.sets = backend._kv_pool.pop() if backend._kv_pool else None
        if self.sets is None:
            self.sets = [{n: DeviceBuffer(backend.rt, f"kv {n} ({side})") for n in self.plan.past}
                         for side in ("ping", "pong")]
            for bufs in self.sets:
                for buf in bufs.values():
                    buf.reserve(self.plan.capacity_bytes)
        self.current = 0  # the set holding the past
        self.length = 0

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if embeds.shape[0] != 1 or mask is not None:
            raise InputError("TrtDecoder decodes one sequence; batches go through HostDecoder")
        if self.sets is None:
            raise RuntimeError("TrtDecoder.step after close()")
        with self.b._lock:
            return self._step(embeds)

    def _step(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, plan = self.b, self.plan
        new = embeds.shape[1]
        if self.length + new > plan.max_length:
            raise InputError(f"llm: {self.length} cached + {new} new positions exceed the engine's {plan.max_length}")
        feeds = {M.INPUTS_EMBEDS: np.ascontiguousarray(embeds, np.float32), **position_feeds(self.length, new)}
        shapes = {n: a.shape for n, a in feeds.items()} | {n: plan.past_shape(self.length) for n in plan.past}
        b._use_profile(select_profile(b.entry.profiles, shapes, b.stage))
        for name, arr in feeds.items():
            b._bind_input(name, arr)
        past, present = self.sets[self.current], self.sets[1 - self.current]
        for name in plan.past:
            b._bind_device_input(name, past[name].ptr, plan.past_shape(self.length))
        dims = resolve_dims(list(b.inputs().values()), shapes)
        b._bind_outputs(dims, device={plan.present_of(n): present[n].ptr for n in plan.past})
        b._execute()
        last = {}
        for name in (M.LOGITS, M.HIDDEN_STATES):
            shape = resolve_shape(b.outputs()[name], dims)  # (1, new, X); newest-only logits (1, 1, V)
            row = np.empty(shape[-1], np.float32)
            b._copy(row.ctypes.data, b._buffers[name].ptr + last_row_offset(shape[1], row.nbytes), row.nbytes,
                    "DeviceToHost", name)
            last[name] = row
        cuda_call(b.rt.cudaStreamSynchronize(b.stream), "cudaStreamSynchronize after a decode step")
        self.current, self.length = 1 - self.current, self.length + new
        return last[M.LOGITS][None], last[M.HIDDEN_STATES][None]

    def close(self) -> None:
        """Hand the KV buffers back to the backend for the next decoder (freed with the backend)."""
        if self.sets is None:
            return
        with self.b._lock:
            if self.b._buffers is not None:
                self.b._kv_pool.append(self.sets)
            else:
                for buf in (x for s in self.sets for x in s.values()):
                    buf.free()
        self.sets = None


def _load_plugin(entry: EngineEntry) -> None:
    """Register the plugin an engine needs before deserializing it (TensorRT looks creators up then).
    An AOT plugin's PTX is inside the engine and needs nothing (NVIDIA/TensorRT
    samples/python/quickly_deployable_plugins/README.md): such engines run without tensorrt.plugin."""
    if not entry.plugin or entry.plugin.get("impl") == "aot":
        return
    if entry.plugin.get("module"):
        importlib.import_module(entry.plugin["module"]).register_plugin()
    elif entry.plugin.get("library"):
        trt = tensorrt()
        registry = trt.get_plugin_registry()
        if registry.load_library(entry.plugin["library"]) is None:
            raise TrtError(f"stage {entry.stage}: could not load plugin library {entry.plugin['library']}")


def open_engines(folder: str | Path, stages: list[str] | None = None, stream: int | None = None) -> dict[str, TrtBackend]:
    """TrtBackends for the engines of `folder` (all, or `stages`), after checking this machine fits them."""
    folder = Path(folder)
    m = load_engines_manifest(folder)
    name, cc = device_info()
    check_compatible(m, tensorrt().__version__, cc, name)
    chosen = [m.engine(s) for s in stages] if stages else m.engines
    return {e.stage: TrtBackend(inside(folder, e.file), e, stream, m.version_compatible) for e in chosen}
