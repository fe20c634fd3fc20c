"""TensorRT optimization profiles from the bundle manifest's symbolic shapes (pure: no TensorRT here).

A manifest TensorSpec has int dims (fixed) and symbolic ones ("batch", "tokens", ...). Each symbol
gets a (min, opt, max) range from the limits; a profile is then, per input, the three shapes.

TensorRT checks the network's shape constraints at each profile's MIN, OPT and MAX point (an
error such as "kOPT values for profile 0 violate shape constraints"), so symbols that the graph
ties together must be consistent at every point. The LLM ties them: total_sequence ==
past_sequence + sequence (the KV-cache Concat and the attention mask). One profile cannot hold
both a long prefill (sequence up to L, no past) and a long decode (sequence 1, past up to L-1)
with total <= L at its MAX point, so stages with a KV cache get two profiles, "prefill" and
"decode" — the two call patterns of Pipeline.decode. Every other stage gets one profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from setok.errors import InputError
from setok.manifest import Manifest, TensorSpec

Dims = tuple[int, ...]
OPT_SEQUENCE = 64  # typical prompt length / cache fill TensorRT tunes kernels for


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"bad dimension range min={self.min} opt={self.opt} max={self.max}")


@dataclass(frozen=True)
class Limits:
    """The largest inputs the engines must accept."""

    max_batch: int
    num_patches: int
    max_tokens: int
    max_sequence: int  # the LLM context (max_position_embeddings)
    opt_sequence: int = OPT_SEQUENCE

    def __post_init__(self) -> None:
        for name in ("max_batch", "num_patches", "max_tokens", "max_sequence"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name}={getattr(self, name)!r}; expected a positive integer")
        if self.max_sequence < 2:
            raise InputError(f"max_sequence={self.max_sequence}; the LLM needs at least 2 positions")

    @classmethod
    def from_manifest(cls, manifest: Manifest, max_batch: int = 1) -> Limits:
        from setok.config import SetokimConfig  # torch-free

        cfg = SetokimConfig.from_dict(manifest.config)
        # The context the bundle was exported for (an HF LLM's own, capped by `export --max-context`).
        context = manifest.text.get("max_positions", manifest.config["llm"]["max_position_embeddings"])
        return cls(max_batch=max_batch, num_patches=cfg.encoder.num_patches, max_tokens=cfg.max_tokens,
                   max_sequence=int(context))


def symbol_ranges(limits: Limits, kv_cache: bool) -> list[tuple[str, dict[str, DimRange]]]:
    """(profile name, symbol -> range) for each profile of a stage (two when it has a KV cache)."""
    L = limits.max_sequence
    opt_seq = min(limits.opt_sequence, L)
    common = {
        "batch": DimRange(1, 1, limits.max_batch),
        # The encoder's grid fixes N: one value, so the cluster plugin sees a build-time constant range.
        "num_patches": DimRange(limits.num_patches, limits.num_patches, limits.num_patches),
        "tokens": DimRange(1, max(1, limits.max_tokens // 2), limits.max_tokens),
    }
    if not kv_cache:
        return [("default", common)]
    opt_past = min(limits.opt_sequence, L - 1)
    prefill = {**common, "sequence": DimRange(1, opt_seq, L), "past_sequence": DimRange(0, 0, 0),
               "total_sequence": DimRange(1, opt_seq, L)}
    decode = {**common, "sequence": DimRange(1, 1, 1), "past_sequence": DimRange(0, opt_past, L - 1),
              "total_sequence": DimRange(1, opt_past + 1, L)}
    return [("prefill", prefill), ("decode", decode)]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[Dims, Dims, Dims]]

    def violation(self, shapes: Mapping[str, Sequence[int]]) -> str | None:
        """Why `shapes` do not fit this profile (the first offending input), or None."""
        for name, (lo, _, hi) in self.shapes.items():
            got = tuple(int(d) for d in shapes.get(name, ()))
            if len(got) != len(lo) or any(not a <= g <= b for a, g, b in zip(lo, got, hi)):
                return f"input {name} has shape {list(got)}; profile {self.name!r} allows {list(lo)}..{list(hi)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {n: [list(s) for s in mmm] for n, mmm in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(d["name"], {n: tuple(tuple(int(x) for x in s) for s in mmm) for n, mmm in d["shapes"].items()})


def _shape_at(spec: TensorSpec, ranges: Mapping[str, DimRange], point: str, stage: str) -> Dims:
    dims = []
    for d in spec.shape:
        if isinstance(d, int):
            dims.append(d)  # static dims are copied
        elif d in ranges:
            dims.append(getattr(ranges[d], point))
        else:
            raise InputError(f"stage {stage}: input {spec.name} has symbolic dim {d!r} with no limit; "
                             f"known: {sorted(ranges)}")
    return tuple(dims)


def stage_profiles(inputs: Sequence[TensorSpec], limits: Limits, stage: str = "?") -> list[Profile]:
    """The optimization profiles of one stage, from its manifest input specs."""
    kv_cache = any("past_sequence" in s.shape for s in inputs)
    return [Profile(name, {s.name: tuple(_shape_at(s, ranges, p, stage) for p in ("min", "opt", "max"))
                           for s in inputs})
            for name, ranges in symbol_ranges(limits, kv_cache)]


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], stage: str = "?") -> int:
    """Index of the first profile containing the concrete input shapes, else InputError saying why."""
    reasons = []
    for i, profile in enumerate(profiles):
        why = profile.violation(shapes)
        if why is None:
            return i
        reasons.append(why)
    raise InputError(f"stage {stage}: no engine profile accepts these inputs: " + "; ".join(reasons)
                     + " (rebuild with larger limits: `setok build`)")


def resolve_dims(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Symbol -> value from concrete input shapes; InputError when one symbol gets two values."""
    dims: dict[str, int] = {}
    for spec in specs:
        shape = shapes[spec.name]
        if len(shape) != len(spec.shape):
            raise InputError(f"input {spec.name} has shape {list(shape)}, expected {spec.shape}")
        for d, v in zip(spec.shape, shape):
            if isinstance(d, str) and dims.setdefault(d, int(v)) != int(v):
                raise InputError(f"input {spec.name}: {d} is {v} here but {dims[d]} in another input")
    return dims


def resolve_shape(spec: TensorSpec, dims: Mapping[str, int]) -> Dims:
    try:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in spec.shape)
    except KeyError as e:
        raise InputError(f"tensor {spec.name}: symbolic dim {e.args[0]!r} is not resolved by the inputs") from None


def buffer_plan(specs: Sequence[TensorSpec], dims: Mapping[str, int]) -> dict[str, int]:
    """Tensor name -> bytes for the given resolved symbolic dims (output allocation)."""
    return {s.name: math.prod(resolve_shape(s, dims)) * np.dtype(s.dtype).itemsize for s in specs}


def max_dims(profiles: Sequence[Profile], specs: Sequence[TensorSpec]) -> dict[str, int]:
    """Each symbol's largest value over all profiles (to size buffers once, if wanted)."""
    out: dict[str, int] = {}
    for p in profiles:
        for s in specs:
            if s.name in p.shapes:
                for d, v in zip(s.shape, p.shapes[s.name][2]):
                    if isinstance(d, str):
                        out[d] = max(out.get(d, 0), v)
    return out


def last_row_offset(rows: int, row_bytes: int) -> int:
    """Byte offset of the last of `rows` rows (batch 1): where the newest position's logits start."""
    if rows < 1:
        raise ValueError(f"rows={rows}; expected at least one")
    return (rows - 1) * row_bytes


@dataclass(frozen=True)
class KvPlan:
    """Device-resident KV cache layout for an llm engine: which inputs are the cache, the output
    each one is fed from, and the bytes one buffer needs for the longest cache the profiles allow."""

    past: tuple[str, ...]  # the cache inputs (the manifest's kv_cache names)
    heads: int
    head_dim: int
    max_length: int  # total positions (past + new) the decode profile allows
    itemsize: int = 4
    present: tuple[str, ...] = ()  # the output feeding each cache input, position by position

    @classmethod
    def from_entry(cls, entry) -> KvPlan:
        from setok.backends.decode import past_specs  # numpy-only

        kv = entry.kv_cache
        past = past_specs(entry.inputs, kv)
        if not past:
            raise InputError(f"stage {entry.stage}: no KV-cache inputs; not an llm engine with a KV cache")
        shapes = {(s.shape[1], s.shape[3]) for s in past}
        if len(shapes) != 1 or not all(isinstance(d, int) for d in next(iter(shapes))):
            raise InputError(f"stage {entry.stage}: KV inputs need one fixed (heads, head_dim); got {sorted(map(str, shapes))}")
        heads, head_dim = next(iter(shapes))
        total = max_dims(entry.profiles, entry.inputs).get("total_sequence")
        if not total:
            raise InputError(f"stage {entry.stage}: its profiles give no total_sequence range")
        present = dict(zip(kv.past, kv.present))
        return cls(tuple(s.name for s in past), heads, head_dim, total, np.dtype(past[0].dtype).itemsize,
                   tuple(present[s.name] for s in past))

    @property
    def capacity_bytes(self) -> int:
        return self.heads * self.max_length * self.head_dim * self.itemsize

    def past_shape(self, length: int) -> Dims:
        return (1, self.heads, length, self.head_dim)

    def present_of(self, past_name: str) -> str:
        return self.present[self.past.index(past_name)]
