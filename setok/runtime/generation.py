"""Text -> image in the runtime: the LLM decodes <target> slots, regress_head turns each slot's
hidden state into a vision token, the detokenizer draws the set. With the manifest config's
gen_feedback, each <target> after the first carries the token drawn at the slot before (regress_head
then projector per slot, as Setokim.greedy does in PyTorch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from setok import manifest as M
from setok.runtime.preprocess import to_uint8
from setok.runtime.results import Image
from setok.runtime.sampling import SamplingParams
from setok.runtime.timing import timed


def generate_image(pipe: Any, prompt: str) -> Image:
    """`pipe`: a setok.runtime.Pipeline (not imported here: it imports this module)."""
    t: dict[str, float] = {}
    target = pipe.ids["<target>"]
    ids = [pipe.ids["<bos>"]] + pipe.encode(pipe.prompts["draw"].format(c=prompt))
    s = SamplingParams(max_new_tokens=pipe.max_tokens + 3)
    drawn: list[np.ndarray] = []  # (1, D) per <target> slot, in order
    feedback = bool(pipe.manifest.config.get("gen_feedback"))

    def embed(tok: int) -> np.ndarray:
        e = pipe.embeddings[[tok]][None]  # (1, 1, H)
        if feedback and tok == target and drawn:
            with timed(t, "projector"):
                e = e + pipe.stage("projector").run({M.VISION_TOKENS: drawn[-1]})[M.EMBEDS][None]
        return e

    hidden = []
    for tok, h in pipe.decode(pipe.embeddings[ids][None], t, s, embed=embed):
        if tok != target:
            continue
        hidden.append(h)
        if feedback:  # the generator resumes (and calls embed) only after this
            drawn.append(regress(pipe, h[None], t))
    slots = hidden[: pipe.max_tokens]
    tokens = np.zeros((1, pipe.max_tokens, pipe.vision_token_dim), np.float32)
    if slots:
        tokens[0, : len(slots)] = np.concatenate(drawn[: len(slots)]) if feedback else regress(pipe, np.stack(slots), t)
    count = max(len(slots), 1)
    with timed(t, "detokenizer"):
        img = pipe.stage("detokenizer").run({M.VISION_TOKENS: tokens, M.NUM_TOKENS: np.array([count], np.int64)})[M.IMAGE]
    return Image(to_uint8(img[0], pipe.manifest.preprocessing), count, t)


def regress(pipe: Any, hidden: np.ndarray, t: dict[str, float]) -> np.ndarray:
    """(K, H) hidden states at <target> slots -> (K, D) vision tokens."""
    with timed(t, "regress_head"):
        return pipe.stage("regress_head").run({M.HIDDEN: hidden.astype(np.float32)})[M.VISION_TOKENS]
