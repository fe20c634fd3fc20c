"""The llm stage's KV-cache decoder on ONNX Runtime: I/O binding keeps the cache in ORT.

Two ways to hold the cache, chosen by the graph's attention (the llm entry's `extra.attention`):

- eager graph (plain ONNX ops): each step's presents (past + this step, new tensors) are bound
  straight back as the next step's past;
- GroupQueryAttention graph: onnxruntime-genai's past-present buffer sharing. After the prefill the
  cache moves into preallocated (B, kv_heads, capacity, head_dim) buffers, and every one-token step
  binds the same buffer as its past input and its present output: the kernel writes the new row in
  place instead of copying the whole past into a new present (at a 4k context that copy is ~100 MB per
  step at the Qwen2.5-0.5B shape). The capacity doubles when the context outgrows it.
"""

from __future__ import annotations

import numpy as np

from setok import manifest as M
from setok.backends.decode import DecoderState, Positions, empty_past, take_newest

MIN_CAPACITY = 64  # positions a shared buffer starts with (doubled as needed)


class OrtDecoder:
    """The presents come back as OrtValues that are bound straight back as the next step's past
    (no numpy conversion, no copy of the cache per step), or live in shared buffers (GQA graphs)."""

    def __init__(self, session, entry: M.StageEntry):
        self.session, self.entry, self.kv = session, entry, entry.kv_cache
        self.outputs = [s.name for s in entry.outputs]
        self.past: dict[str, object] | None = None  # OrtValues, by past input name
        self.positions = Positions()
        self.share = entry.extra.get("attention") == M.GQA_ATTENTION
        self.buffers: dict[str, np.ndarray] | None = None  # shared mode: (B, kv_heads, capacity, hd) by past name

    @property
    def length(self) -> int:
        return self.positions.length

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        embeds = np.ascontiguousarray(embeds, np.float32)
        before = self.positions.length
        feeds = {M.INPUTS_EMBEDS: embeds, **self.positions.feeds(embeds, mask)}
        shared = self.share and embeds.shape[1] == 1 and (self.past is not None or self.buffers is not None)
        if shared:
            self._reserve(self.positions.length)
        elif self.buffers is not None:  # a multi-token chunk after shared steps: back to exact-length pasts
            self.past, self.buffers = self._valid(before), None
        elif self.past is None:
            feeds.update(empty_past(self.entry, embeds.shape[0]))
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        outputs = [M.LOGITS, M.HIDDEN_STATES] if shared else self.outputs
        for name in outputs:  # first: get_outputs() lists the bound outputs in binding order
            binding.bind_output(name, "cpu")
        self._bind_cache(binding, shared)
        self.session.run_with_iobinding(binding)
        values = dict(zip(outputs, binding.get_outputs()))
        if not shared:
            self.past = self.kv.as_past(values)
        # Only these two leave ORT, and only each row's newest real token is kept.
        cols = self.positions.columns
        return take_newest(values[M.LOGITS].numpy(), cols), take_newest(values[M.HIDDEN_STATES].numpy(), cols)

    def _bind_cache(self, binding, shared: bool) -> None:
        """Bind the past (and, shared, the presents into the same buffers)."""
        import onnxruntime as ort

        if not shared:
            for name, value in (self.past or {}).items():
                binding.bind_ortvalue_input(name, value)
            return
        for past, present in zip(self.kv.past, self.kv.present):
            value = ort.OrtValue.ortvalue_from_numpy(self.buffers[past])  # CPU: wraps the array, no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _reserve(self, width: int) -> None:
        """Shared buffers holding at least `width` positions, the cache so far copied in once."""
        if self.buffers is None:
            cache = {n: v.numpy() for n, v in self.past.items()}
            self.past = None
        elif width <= self.capacity:
            return
        else:
            cache = self.buffers
        capacity = max(MIN_CAPACITY, width)
        capacity = 1 << (capacity - 1).bit_length()  # a power of two: log2(context) reallocations at most
        self.buffers = {}
        for name, arr in cache.items():
            b, heads, used, hd = arr.shape
            buf = np.zeros((b, heads, capacity, hd), np.float32)
            buf[:, :, :used] = arr
            self.buffers[name] = buf

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0

    def _valid(self, width: int) -> dict[str, object]:
        """The shared buffers cut to `width` positions, as OrtValues (copies)."""
        import onnxruntime as ort

        return {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b[:, :, :width])) for n, b in self.buffers.items()}

    def snapshot(self) -> DecoderState:
        """The cache (OrtValues: ORT never writes into an input, and shared buffers are copied) and
        positions so far."""
        if self.buffers is not None:
            return DecoderState(self._valid(self.positions.length), self.positions.copy())
        return DecoderState(dict(self.past or {}), self.positions.copy())

    def restore(self, state: DecoderState) -> None:
        self.past, self.positions, self.buffers = dict(state.past) or None, state.positions.copy(), None

    def close(self) -> None:
        self.past = self.buffers = None
