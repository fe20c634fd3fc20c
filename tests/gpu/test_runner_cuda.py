"""TrtBackend / TrtDecoder's cuda-python plumbing against real device memory, without TensorRT.

The engine is the bundle's llm.onnx run by ONNX Runtime on host: the stand-in execution context
copies the bound *device* inputs down, runs the graph, and copies the outputs up to the bound device
addresses (cudaMemcpy), so every cudaMalloc, stream, async copy and the device-resident KV cache of
the runner are real. The one stand-in is TensorRT's engine/context (not installed on such machines).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from trt_engine_fake import RecordingContext, fake_tensorrt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")]


@pytest.fixture(scope="module")
def rt():
    from setok.backends.trt.runner import cuda_call, cudart

    runtime = cudart()
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA device")
    cuda_call(runtime.cudaSetDevice(0), "cudaSetDevice")
    return runtime


class _OrtOnDevice(RecordingContext):
    entry = session = rt = None  # set by the test

    def __init__(self, io):
        super().__init__(io)
        self.executed = 0

    def get_tensor_shape(self, name):
        from setok.backends.trt.profiles import resolve_dims, resolve_shape

        specs = {s.name: s for s in self.entry.outputs}
        return resolve_shape(specs[name], resolve_dims(self.entry.inputs, self.shapes)) if name in specs else self.shapes[name]

    def execute_async_v3(self, stream):
        from setok.backends.trt.runner import cuda_call

        rt = self.rt
        cuda_call(rt.cudaStreamSynchronize(stream), "sync before the stand-in engine")
        feeds = {}
        for s in self.entry.inputs:
            arr = np.empty(self.shapes[s.name], s.dtype)
            if arr.nbytes:
                cuda_call(rt.cudaMemcpy(arr.ctypes.data, self.addr[s.name], arr.nbytes,
                                        rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), f"down {s.name}")
            feeds[s.name] = arr
        for spec, value in zip(self.entry.outputs, self.session.run(None, feeds)):
            value = np.ascontiguousarray(value, spec.dtype)
            assert tuple(value.shape) == tuple(self.get_tensor_shape(spec.name)), spec.name
            if value.nbytes:
                cuda_call(rt.cudaMemcpy(self.addr[spec.name], value.ctypes.data, value.nbytes,
                                        rt.cudaMemcpyKind.cudaMemcpyHostToDevice), f"up {spec.name}")
        self.executed += 1
        return True


def _engine_trt(io):
    return fake_tensorrt(io, _OrtOnDevice, version="10.9.0")


def test_decoder_on_device_memory_matches_onnxruntime(tiny_bundle, rt, tmp_path, monkeypatch):
    import onnxruntime as ort

    import setok.backends.trt.runner as T
    from setok.backends.decode import HostDecoder
    from setok.backends.onnxrt.session import OrtBackend
    from setok.backends.trt.engines import EngineEntry
    from setok.backends.trt.profiles import Limits, stage_profiles
    from setok.manifest import load_manifest

    manifest = load_manifest(tiny_bundle)
    llm = manifest.stage("llm")
    limits = Limits.from_manifest(manifest)
    _OrtOnDevice.entry, _OrtOnDevice.rt = llm, rt
    _OrtOnDevice.session = ort.InferenceSession(str(tiny_bundle / llm.file), providers=["CPUExecutionProvider"])
    io = {s.name: ("in", s.dtype) for s in llm.inputs} | {s.name: ("out", s.dtype) for s in llm.outputs}
    monkeypatch.setattr(T, "tensorrt", lambda: _engine_trt(io))
    monkeypatch.setattr(T, "_LOGGER", None)
    entry = EngineEntry("llm", "llm.engine", "", llm.file, "fp32", llm.inputs, llm.outputs,
                        stage_profiles(llm.inputs, limits, "llm"))
    (tmp_path / "llm.engine").write_bytes(b"plan")
    backend = T.TrtBackend(tmp_path / "llm.engine", entry)
    dec, host = backend.decoder(), HostDecoder(OrtBackend(tiny_bundle / llm.file, llm), llm)
    rng = np.random.default_rng(0)
    hidden = llm.inputs[0].shape[2]
    steps = [rng.standard_normal((1, 9, hidden)).astype(np.float32)]
    steps += [rng.standard_normal((1, 1, hidden)).astype(np.float32) for _ in range(6)]
    for x in steps:
        (la, ha), (lb, hb) = dec.step(x), host.step(x)
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ha, hb, rtol=1e-5, atol=1e-5)
    assert dec.length == 9 + 6 and backend.context.profiles == [0, 1] and backend.context.executed == len(steps)
    assert math.isfinite(float(la.sum()))
    dec.close()
    backend.close()
