"""How the decode picks each token: `SamplingParams`, the sampler, stop strings. Numpy only.

Greedy (temperature 0) is the default everywhere. With temperature > 0 the logits are divided by
it, cut to the `top_k` largest (0: all), turned into probabilities and cut to the smallest set
whose mass reaches `top_p` (1: all); `seed` fixes the random generator, so one seed gives one
output. Stop strings end the text before their first occurrence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from setok.errors import InputError

MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    max_new_tokens: int | None = None  # None: the method's default (answer 8, caption and stream 64)
    stop: tuple[str, ...] = ()  # the text ends before the first of these

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop) if isinstance(self.stop, (list, set)) else self.stop)
        _check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
               and 0 <= self.temperature < float("inf"), "temperature", self.temperature, "a number >= 0")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0: no limit)")
        _check(isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1,
               "top_p", self.top_p, "a number in (0, 1]")
        _check(self.seed is None or (_is_int(self.seed) and self.seed >= 0), "seed", self.seed,
               "None or an integer >= 0")
        _check(self.max_new_tokens is None or (_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS),
               "max_new_tokens", self.max_new_tokens, f"1..{MAX_NEW_TOKENS}")
        _check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def resolve(sampling: SamplingParams | None, default_max: int, **overrides: Any) -> SamplingParams:
    """`sampling` (or the defaults) with every keyword argument that was given (not None) applied,
    and max_new_tokens filled in: the old keyword arguments and SamplingParams mean one thing."""
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling: got {type(sampling).__name__}; expected setok.runtime.SamplingParams")
    base = sampling or SamplingParams()
    given = {k: v for k, v in overrides.items() if v is not None}
    if base.max_new_tokens is None and "max_new_tokens" not in given:
        given["max_new_tokens"] = default_max
    return base.replace(**given) if given else base


def pick(logits: np.ndarray, s: SamplingParams, rng: np.random.Generator, allowed: np.ndarray | None = None) -> int:
    """One token id from (V,) logits; `allowed` (V,) bool masks the rest out (structured answers)."""
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k > 0:
        z[np.argsort(z)[: -s.top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]  # smallest set with mass >= top_p
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(len(p), p=p))


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still start a stop string (a stream holds them back)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check(ok: bool, name: str, got: Any, expected: str) -> None:
    if not ok:
        raise InputError(f"{name}: got {got!r}; expected {expected}")
