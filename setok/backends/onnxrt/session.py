"""ONNX Runtime, the embedded default: one session per stage of a bundle. No torch here."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from setok.backends.base import StageIO
from setok.errors import BundleError
from setok.manifest import StageEntry

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}

log = logging.getLogger(__name__)


def session_options(entry: StageEntry, threads: int | None = None, spin: bool = True):
    """SessionOptions for one stage: its custom-op library when the graph holds one, threads, spinning."""
    import onnxruntime as ort

    if entry.custom_op:
        from setok.backends.onnxrt.custom_op import plugin_session_options

        opts = plugin_session_options(entry.custom_op)
    else:
        opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        # Idle ORT threads otherwise busy-wait for the next run, starving anything else in
        # the process (another framework, the app's own threads) for a few milliseconds.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtBackend(StageIO):
    """One ONNX Runtime session for one stage of a bundle."""

    def __init__(self, path: Path, entry: StageEntry, providers: list[str] | None = None,
                 threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        super().__init__(entry.name, entry.inputs, entry.outputs)
        self.entry = entry
        self.session = ort.InferenceSession(str(path), sess_options=session_options(entry, threads, spin),
                                            providers=providers or ["CPUExecutionProvider"])
        self._check_graph()

    def _check_graph(self) -> None:
        """The manifest is the contract: a graph whose I/O names, dtypes or fixed dims differ from
        it is refused at open (not with an ONNX Runtime error at the first run)."""
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(got_in) != sorted(self._inputs) or sorted(got_out) != sorted(self._outputs):
            raise BundleError(f"stage {self.entry.name} ({self.entry.file}): graph I/O {got_in} -> {got_out} does not "
                              f"match the manifest's {list(self._inputs)} -> {list(self._outputs)}; re-export the bundle")
        for side, args, specs in (("input", self.session.get_inputs(), self._inputs),
                                  ("output", self.session.get_outputs(), self._outputs)):
            for a in args:
                spec, dtype, dims = specs[a.name], ORT_DTYPES.get(a.type, a.type), list(a.shape)
                same = len(dims) == len(spec.shape) and all(
                    not (isinstance(d, int) and isinstance(g, int)) or d == g for d, g in zip(spec.shape, dims))
                if dtype != spec.dtype or not same:
                    raise BundleError(f"stage {self.entry.name} ({self.entry.file}): {side} {a.name} is {dtype} {dims} "
                                      f"in the graph but {spec.dtype} {spec.shape} in the manifest; re-export the bundle")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        names = list(self._outputs)
        return dict(zip(names, self.session.run(names, feeds)))

    def decoder(self, batch: int = 1):
        """The llm stage's KV-cache decoder (any batch): I/O binding, cache kept in ORT."""
        from setok.backends.onnxrt.decoder import OrtDecoder

        return OrtDecoder(self.session, self.entry)

    def close(self) -> None:
        self.session = None
