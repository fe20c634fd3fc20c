"""The llm stage's KV-cache decoder on ONNX Runtime: I/O binding keeps the cache in ORT."""

from __future__ import annotations

import numpy as np

from setok import manifest as M
from setok.backends.decode import DecoderState, Positions, empty_past


class OrtDecoder:
    """The presents come back as OrtValues that are bound straight back as the next step's past
    (no numpy conversion, no copy of the cache per step)."""

    def __init__(self, session, entry: M.StageEntry):
        self.session, self.entry, self.kv = session, entry, entry.kv_cache
        self.outputs = [s.name for s in entry.outputs]
        self.past: dict[str, object] | None = None  # OrtValues, by past input name
        self.positions = Positions()

    @property
    def length(self) -> int:
        return self.positions.length

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        embeds = np.ascontiguousarray(embeds, np.float32)
        feeds = {M.INPUTS_EMBEDS: embeds, **self.positions.feeds(embeds, mask)}
        if self.past is None:
            feeds.update(empty_past(self.entry, embeds.shape[0]))
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, value in (self.past or {}).items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = dict(zip(self.outputs, binding.get_outputs()))
        self.past = self.kv.as_past(values)
        # Only these two leave ORT, and only their last position is kept.
        return values[M.LOGITS].numpy()[:, -1], values[M.HIDDEN_STATES].numpy()[:, -1]

    def snapshot(self) -> DecoderState:
        """The cache (OrtValues: ORT never writes into an input) and positions so far."""
        return DecoderState(dict(self.past or {}), self.positions.copy())

    def restore(self, state: DecoderState) -> None:
        self.past, self.positions = dict(state.past) or None, state.positions.copy()

    def close(self) -> None:
        self.past = None
