"""`setok bench BUNDLE --frame-loop`: a robot's loop (a new frame, the same question) timed to the
first token, with and without the prompt-prefix KV cache. Torch-free.

Time to first token (TTFT) is the wall time from the frame to the first answer token: the vision
stages, the prompt, the prefill and the first pick (the decode step that feeds that token back is
excluded). Both pipelines see the same frames in the same order, interleaved, so machine noise
falls on both alike; their answers are compared too (the cache must not change them).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from setok.data.items import eval_items
from setok.runtime.pipeline import Pipeline

QUESTION = "how many objects are there"


def frame_loop(bundle: Path, n: int = 50, warmup: int = 5, threads: int | None = None,
               question: str = QUESTION) -> dict:
    frames = [it.image for it in eval_items(n + warmup, seed=77)]
    pipes = {"cached": Pipeline.open(bundle, threads=threads), "uncached": Pipeline.open(bundle, threads=threads,
                                                                                         prefix_cache=0)}
    ttft: dict[str, list[float]] = {k: [] for k in pipes}
    prefill: dict[str, list[float]] = {k: [] for k in pipes}
    answers: dict[str, list[list[int]]] = {k: [] for k in pipes}
    try:
        for i, frame in enumerate(frames):
            for name, pipe in pipes.items():
                start = time.perf_counter()
                text = pipe.answer(frame, question, max_new_tokens=1)
                wall = time.perf_counter() - start - text.timings.get("llm_decode", 0.0)
                if i >= warmup:
                    ttft[name].append(wall)
                    prefill[name].append(text.timings["llm_prefill"])
                    answers[name].append(text.token_ids)
        stats = pipes["cached"].prefix_cache.stats()
    finally:
        for pipe in pipes.values():
            pipe.close()
    out: dict = {"bundle": str(bundle), "frames": n, "warmup": warmup, "question": question,
                 "prompt_prefix_tokens": len(pipes["cached"].encode("question " + question)) + 2}
    for name in pipes:
        out[name] = {"ttft_ms_median": _ms(np.median(ttft[name])), "ttft_ms_p90": _ms(np.percentile(ttft[name], 90)),
                     "prefill_ms_median": _ms(np.median(prefill[name]))}
    out["ttft_ratio"] = round(out["cached"]["ttft_ms_median"] / out["uncached"]["ttft_ms_median"], 3)
    out["same_first_tokens"] = answers["cached"] == answers["uncached"]
    out["cache"] = stats
    return out


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 3)
