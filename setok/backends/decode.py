"""KV-cache decoders for the `llm` stage: prefill once, then one token per step.

The LLM graph (optimum's decoder with past) takes the cache inputs and returns the presents
(past + this step); which output feeds which input is the llm entry's `kv_cache` in the
manifest (`setok.manifest.KvCache`). A decoder keeps the cache where the backend keeps tensors,
so the loop never brings it back to Python:

- `HostDecoder` (here): any backend with `run()`; the cache is a dict of numpy arrays (the fallback).
- `setok.backends.onnxrt.decoder.OrtDecoder`: ONNX Runtime I/O binding; the cache stays as OrtValues.
- `setok.backends.trt.runner.TrtDecoder`: device buffers, ping-ponged between steps (never on the host).

Every decoder returns, per call, only the last position's logits and hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from setok import manifest as M


class Decoder(Protocol):
    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, L, H) embeddings after everything fed so far -> (B, V) logits, (B, H) hidden of the
        real token of each row. `mask` (B, L), first call only: 0 marks padding of a batched prompt."""
        ...

    def close(self) -> None:
        """Release the cache (a TensorRT decoder hands its device buffers back for reuse)."""
        ...


def past_specs(inputs: list[M.TensorSpec], kv: M.KvCache) -> list[M.TensorSpec]:
    names = set(kv.past)
    return [s for s in inputs if s.name in names]


def empty_past(entry: M.StageEntry, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length caches, (B, heads, 0, head_dim), for the first (prefill) call."""
    out = {}
    for spec in past_specs(entry.inputs, entry.kv_cache):
        _, heads, _, hd = spec.shape
        out[spec.name] = np.zeros((batch, heads, 0, hd), np.float32)
    return out


def position_feeds(past_len: int, length: int) -> dict[str, np.ndarray]:
    """Mask and positions of one unpadded sequence (batch 1)."""
    return {M.ATTENTION_MASK: np.ones((1, past_len + length), np.int64),
            M.POSITION_IDS: np.arange(past_len, past_len + length, dtype=np.int64)[None]}


def prefill_feeds(entry: M.StageEntry, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """Every input of one unpadded prefill (batch 1, empty past)."""
    return {M.INPUTS_EMBEDS: embeds, **position_feeds(0, embeds.shape[1]), **empty_past(entry, embeds.shape[0])}


def newest(mask: np.ndarray) -> np.ndarray:
    """(B, L) mask -> (B,) column of each row's last real token (left- or right-padded rows)."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)


def take_newest(values: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    """(B, L, X) -> (B, X): each row at its newest real token (the last column when None). A graph
    that already emits only that token (L = 1: the GQA form's logits) gives it as is."""
    if columns is None or values.shape[1] == 1:
        return values[:, -1]
    return values[np.arange(values.shape[0]), columns]


def teacher_forced_logits(run, feed: dict, out: dict) -> np.ndarray:
    """(B, L, V) logits at every position of `feed` (a prefill on an empty past, unpadded rows), given
    the graph's outputs `out` for it. A graph that emits only the newest position's logits (the GQA
    form) is stepped through the sequence one token at a time on its own KV cache instead, which is
    also how decoding reads it. `run`: feeds -> {output name: array}."""
    embeds, mask, pos = feed[M.INPUTS_EMBEDS], feed[M.ATTENTION_MASK], feed[M.POSITION_IDS]
    if out[M.LOGITS].shape[1] == embeds.shape[1]:
        return out[M.LOGITS]
    if not mask.all():
        raise ValueError("stepping a newest-logits graph needs unpadded rows")
    past = {k: v for k, v in feed.items() if k not in (M.INPUTS_EMBEDS, M.ATTENTION_MASK, M.POSITION_IDS)}
    rows = []
    for t in range(embeds.shape[1]):
        step = run({M.INPUTS_EMBEDS: embeds[:, t:t + 1], M.ATTENTION_MASK: mask[:, :t + 1],
                    M.POSITION_IDS: pos[:, t:t + 1], **past})
        rows.append(step[M.LOGITS][:, -1])
        kv = M.KvCache.for_layers(len(step))  # the output count bounds the layers
        past = {p: step[q] for p, q in zip(kv.past, kv.present) if q in step}
    return np.stack(rows, 1)


class Positions:
    """attention_mask and position_ids across steps; padding counts no position (as
    Setokim.collate does), so a batched prompt decodes like each one alone. Batched prompts come
    right-padded from the runtime (GroupQueryAttention reads the mask as lengths, so its graphs
    need that; the eager graph takes either side): the decode steps then append after the
    padding, which the mask keeps out of attention."""

    def __init__(self) -> None:
        self.mask: np.ndarray | None = None  # (B, total)
        self.last: np.ndarray | None = None  # (B, 1) position of the newest token
        self.columns: np.ndarray | None = None  # (B,) this call's newest real token per row; None: the last

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def feeds(self, embeds: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        b, new = embeds.shape[:2]
        self.columns = None
        if self.mask is None:
            m = np.ones((b, new), np.int64) if mask is None else np.asarray(mask, np.int64)
            pos = np.maximum(np.cumsum(m, 1) - 1, 0)
            self.mask = m
            if mask is not None:
                self.columns = newest(m)
        else:
            pos = self.last + np.arange(1, new + 1, dtype=np.int64)[None]
            self.mask = np.concatenate([self.mask, np.ones((b, new), np.int64)], 1)
        self.last = pos[:, -1:]  # right padding: the row's last real position (cumsum stops counting)
        return {M.ATTENTION_MASK: self.mask, M.POSITION_IDS: pos}

    def copy(self) -> Positions:
        other = Positions()
        other.mask = None if self.mask is None else self.mask.copy()
        other.last = None if self.last is None else self.last.copy()
        other.columns = None if self.columns is None else self.columns.copy()
        return other


@dataclass(frozen=True)
class DecoderState:
    """A decoder's cache and positions after a prompt prefix (`snapshot`): restored into a fresh
    decoder (`restore`), the prefill continues from there. Later steps never modify it (each step's
    presents are new tensors), so one state can seed many decoders, on any thread."""

    past: dict
    positions: Positions


class HostDecoder:
    """Works with every backend: feeds the cache back as numpy arrays."""

    def __init__(self, backend, entry: M.StageEntry):
        self.backend, self.entry, self.kv = backend, entry, entry.kv_cache
        self.past: dict[str, np.ndarray] | None = None
        self.positions = Positions()

    @property
    def length(self) -> int:
        return self.positions.length

    def step(self, embeds: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        past = self.past if self.past is not None else empty_past(self.entry, embeds.shape[0])
        out = self.backend.run({M.INPUTS_EMBEDS: embeds, **self.positions.feeds(embeds, mask), **past})
        self.past = self.kv.as_past(out)
        cols = self.positions.columns
        return take_newest(out[M.LOGITS], cols), take_newest(out[M.HIDDEN_STATES], cols)

    def snapshot(self) -> DecoderState:
        return DecoderState(dict(self.past or {}), self.positions.copy())

    def restore(self, state: DecoderState) -> None:
        self.past, self.positions = dict(state.past) or None, state.positions.copy()

    def close(self) -> None:
        self.past = None
