"""KV-cache decoders for the `llm` stage: prefill once, then one token per step.

The LLM graph (optimum's decoder with past) takes `past_key_values.{i}.{key,value}` and returns
`present.{i}.{key,value}` = past + this step. A decoder keeps the cache where the backend keeps
tensors, so the loop never brings it back to Python:

- `HostDecoder`: any backend with `run()`; the cache is a dict of numpy arrays (the fallback).
- `OrtDecoder`: ONNX Runtime I/O binding; the cache stays as OrtValues that are bound straight
  back as the next step's inputs (no numpy conversion, no copy of the cache per step).
- `setok.runtime.trt.TrtDecoder`: device buffers, ping-ponged between steps (never on the host).

Every decoder returns, per call, only the last position's logits and hidden state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from setok import manifest as M

PAST, PRESENT = "past_key_values.", "present."


class Decoder(Protocol):
    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, H) embeddings after everything fed so far -> (B, V) logits, (B, H) hidden of the
        last position. `mask` (B, L), first call only: 0 marks left padding of a batched prompt."""
        ...

    def close(self) -> None:
        """Release the cache (a TensorRT decoder hands its device buffers back for reuse)."""
        ...


def past_specs(entry: M.StageEntry) -> list[M.TensorSpec]:
    return [s for s in entry.inputs if s.name.startswith(PAST)]


def empty_past(entry: M.StageEntry, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length caches, (B, heads, 0, head_dim), for the first (prefill) call."""
    out = {}
    for spec in past_specs(entry):
        _, heads, _, hd = spec.shape
        out[spec.name] = np.zeros((batch, heads, 0, hd), np.float32)
    return out


def position_feeds(past_len: int, length: int) -> dict[str, np.ndarray]:
    """Mask and positions of one unpadded sequence (batch 1)."""
    return {"attention_mask": np.ones((1, past_len + length), np.int64),
            "position_ids": np.arange(past_len, past_len + length, dtype=np.int64)[None]}


class Positions:
    """attention_mask and position_ids across steps; left padding counts no position (as
    Setokim.collate(left_pad=True) does), so a batched prompt decodes like each one alone."""

    def __init__(self) -> None:
        self.mask: np.ndarray | None = None  # (B, total)
        self.last: np.ndarray | None = None  # (B, 1) position of the newest token

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def feeds(self, embeds: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        b, new = embeds.shape[:2]
        if self.mask is None:
            m = np.ones((b, new), np.int64) if mask is None else np.asarray(mask, np.int64)
            pos = np.maximum(np.cumsum(m, 1) - 1, 0)
            self.mask = m
        else:
            pos = self.last + np.arange(1, new + 1, dtype=np.int64)[None]
            self.mask = np.concatenate([self.mask, np.ones((b, new), np.int64)], 1)
        self.last = pos[:, -1:]
        return {"attention_mask": self.mask, "position_ids": pos}


class HostDecoder:
    """Works with every backend: feeds the cache back as numpy arrays."""

    def __init__(self, backend, entry: M.StageEntry):
        self.backend, self.entry = backend, entry
        self.past: dict[str, np.ndarray] | None = None
        self.positions = Positions()

    @property
    def length(self) -> int:
        return self.positions.length

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        past = self.past if self.past is not None else empty_past(self.entry, embeds.shape[0])
        out = self.backend.run({"inputs_embeds": embeds, **self.positions.feeds(embeds, mask), **past})
        self.past = {PAST + k[len(PRESENT):]: v for k, v in out.items() if k.startswith(PRESENT)}
        return out["logits"][:, -1], out["hidden_states"][:, -1]

    def close(self) -> None:
        self.past = None


class OrtDecoder:
    """ONNX Runtime with I/O binding: the cache never leaves ORT between steps."""

    def __init__(self, session, entry: M.StageEntry):
        self.session, self.entry = session, entry
        self.outputs = [s.name for s in entry.outputs]
        self.past: dict[str, object] | None = None  # OrtValues, by past input name
        self.positions = Positions()

    @property
    def length(self) -> int:
        return self.positions.length

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        embeds = np.ascontiguousarray(embeds, np.float32)
        feeds = {"inputs_embeds": embeds, **self.positions.feeds(embeds, mask)}
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
        self.past = {PAST + k[len(PRESENT):]: v for k, v in values.items() if k.startswith(PRESENT)}
        # Only these two leave ORT, and only their last position is kept.
        return values["logits"].numpy()[:, -1], values["hidden_states"].numpy()[:, -1]

    def close(self) -> None:
        self.past = None
