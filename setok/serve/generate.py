"""Decoding for the server: `Pipeline.answer`'s decode with the runtime's own sampler and stop
strings (setok.runtime.sampling), as text pieces for streaming, stopped between tokens when the
client leaves.

Greedy decoding and seeded sampling pick exactly the tokens the runtime picks (the same sampler,
the same random generator); a test holds both to `Pipeline.answer`.
Batched greedy answers go through `Pipeline.answer_batch` instead (see `setok.serve.batcher`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from setok import manifest as M
from setok.errors import InputError
from setok.runtime.pipeline import Pipeline, Tokens
from setok.runtime.sampling import SamplingParams, cut_at_stop, held_back, pick
from setok.runtime.timing import timed

MAX_NEW_TOKENS = 4096  # the runtime's own limit


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy, the runtime's default (OpenAI's default of 1 is not)
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def params(self) -> SamplingParams:
        """The runtime's form of these options (OpenAI's max_tokens is its max_new_tokens)."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=self.max_tokens, stop=self.stop)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    vision_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def prompt_length(pipe: Pipeline, question: str, vision_tokens: int) -> int:
    """Tokens of the question prompt with `vision_tokens` image slots, as `Pipeline.prompt` lays
    it out: <bos> before <im_start> V.. <im_end> after."""
    before, after = M.split_prompt(pipe.prompts["question"], q=question)
    encode = pipe.tokenizer.encode
    return 3 + vision_tokens + len(encode(before, add_special_tokens=False).ids) + len(
        encode(after, add_special_tokens=False).ids)


def check_context(pipe: Pipeline, prompt_tokens: int, max_tokens: int) -> None:
    limit = pipe.manifest.text["max_positions"]
    if prompt_tokens + max_tokens > limit:
        raise InputError(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the model's context "
                         f"of {limit}; lower max_tokens or shorten the question")


class Generation:
    """One request's decode: the prompt is built (and checked) on construction, so a request that
    cannot run fails before a streamed response has started."""

    def __init__(self, pipe: Pipeline, vt: Tokens, question: str, sampling: Sampling):
        self.pipe, self.vt, self.s = pipe, vt, sampling
        self.params = sampling.params  # the runtime's sampler options, built once (not per token)
        # The runtime lays the prompt out; the server must not lay it out a second way.
        self.embeds, _ = pipe.prompt(vt, pipe.prompts["question"], q=question)
        check_context(pipe, self.embeds.shape[1], sampling.max_tokens)
        self.ids: list[int] = []
        self.finish_reason = "length"

    def tokens(self, cancelled: threading.Event | None = None) -> Iterator[int]:
        """Token ids until <eos>, max_tokens or `cancelled` (checked between tokens)."""
        pipe, t = self.pipe, self.vt.timings
        rng = np.random.default_rng(self.s.seed)
        decoder = pipe.stage("llm").decoder(1)
        try:
            with timed(t, "llm_prefill"):
                logits, _ = decoder.step(self.embeds)
            for i in range(self.s.max_tokens):
                tok = pick(logits[0], self.params, rng)
                if tok == pipe.ids["<eos>"]:
                    self.finish_reason = "stop"
                    return
                yield tok
                if (cancelled is not None and cancelled.is_set()) or i + 1 == self.s.max_tokens:
                    return
                with timed(t, "llm_decode"):
                    logits, _ = decoder.step(pipe.embeddings[[tok]][None])
        finally:  # also when the consumer stops early (a stop string, a closed stream)
            decoder.close()

    def pieces(self, cancelled: threading.Event | None = None) -> Iterator[str]:
        """Text pieces whose concatenation is the final text: stripped like `Pipeline.answer`'s,
        cut before the first stop string (a possible stop-string start is held back)."""
        sent = 0
        for tok in self.tokens(cancelled):
            self.ids.append(tok)
            text, stopped = cut_at_stop(self._text().lstrip(), self.s.stop)
            if stopped:
                self.finish_reason = "stop"
                yield text[sent:]
                return
            ready = min(len(text.rstrip()), len(text) - held_back(text, self.s.stop))
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        yield self.text[sent:]

    @property
    def text(self) -> str:
        return cut_at_stop(self._text().strip(), self.s.stop)[0]

    def _text(self) -> str:
        return self.pipe.tokenizer.decode(self.ids, skip_special_tokens=True)

    def run(self) -> Completion:
        for _ in self.pieces():
            pass
        return Completion(self.text, list(self.ids), self.finish_reason, int(self.embeds.shape[1]), self.vt.num_tokens,
                          self.vt.timings)
