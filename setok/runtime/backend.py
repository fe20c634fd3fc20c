"""Backends share one small protocol; ONNX Runtime is the embedded default. No torch here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from setok.errors import InputError
from setok.manifest import StageEntry, TensorSpec

log = logging.getLogger(__name__)


class Backend(Protocol):
    def inputs(self) -> dict[str, TensorSpec]: ...
    def outputs(self) -> dict[str, TensorSpec]: ...
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def close(self) -> None: ...


def check_feeds(stage: str, specs: dict[str, TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Names, dtypes and fixed dims first, so a wrong tensor is named instead of failing deep in ORT."""
    missing, extra = set(specs) - set(feeds), set(feeds) - set(specs)
    if missing or extra:
        raise InputError(f"stage {stage}: inputs {sorted(feeds)} do not match {sorted(specs)}")
    for name, spec in specs.items():
        arr = feeds[name]
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(f"stage {stage}: input {name} is {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)):
            raise InputError(f"stage {stage}: input {name} has shape {list(arr.shape)}, expected {spec.shape}")


class OrtBackend:
    """One ONNX Runtime session for one stage of a bundle."""

    def __init__(self, path: Path, entry: StageEntry, providers: list[str] | None = None,
                 threads: int | None = None, session_options=None, spin: bool = True):
        import onnxruntime as ort

        self.entry = entry
        opts = session_options or ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            # Idle ORT threads otherwise busy-wait for the next run, starving anything else in
            # the process (another framework, the app's own threads) for a few milliseconds.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
        self._inputs = {t.name: t for t in entry.inputs}
        self._outputs = {t.name: t for t in entry.outputs}
        self._check_graph()

    def _check_graph(self) -> None:
        """The manifest is the contract: a graph whose I/O differs from it is refused at open."""
        from setok.manifest import BundleError

        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(got_in) != sorted(self._inputs) or sorted(got_out) != sorted(self._outputs):
            raise BundleError(f"stage {self.entry.name} ({self.entry.file}): graph I/O {got_in} -> {got_out} does not "
                              f"match the manifest's {list(self._inputs)} -> {list(self._outputs)}; re-export the bundle")

    def inputs(self) -> dict[str, TensorSpec]:
        return self._inputs

    def outputs(self) -> dict[str, TensorSpec]:
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.entry.name, self._inputs, feeds)
        names = list(self._outputs)
        return dict(zip(names, self.session.run(names, feeds)))

    def decoder(self):
        """A KV-cache decoder over this session (the llm stage only): I/O binding, cache kept in ORT."""
        from setok.runtime.decode import OrtDecoder

        return OrtDecoder(self.session, self.entry)

    def close(self) -> None:
        self.session = None
