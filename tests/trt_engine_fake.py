"""A stand-in for the `tensorrt` module's engine side (runtime, engine, I/O modes, logger): what
setok.backends.trt.runner touches to deserialize an engine and bind its tensors. The execution
context is the caller's (a CPU fake, or ONNX Runtime writing into real device memory), so the
runner's own buffer, stream and copy logic is what the tests exercise."""

import types

import numpy as np


def fake_tensorrt(io: dict, context, version: str = "10.8.0.43") -> types.SimpleNamespace:
    """`io`: tensor name -> (mode, dtype); `context(io)` makes the execution context."""

    class Engine:
        num_io_tensors = len(io)

        def get_tensor_name(self, i):
            return list(io)[i]

        def get_tensor_mode(self, name):
            return io[name][0]

        def get_tensor_dtype(self, name):
            return io[name][1]

        def create_execution_context(self):
            self.context = context(io)
            return self.context

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return Engine()

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    return types.SimpleNamespace(Runtime=Runtime, ILogger=ILogger, nptype=np.dtype, __version__=version,
                                 TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"))


class RecordingContext:
    """An execution context that records what the runner binds; subclasses compute outputs."""

    def __init__(self, io):
        self.io, self.shapes, self.addr, self.profiles = io, {}, {}, []

    def set_optimization_profile_async(self, i, stream):
        self.profiles.append(i)
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)
        return True
