"""The stage-2 training sequences of one image (caption, questions, a referring expression,
generation) and the token orders and labels they carry."""

from __future__ import annotations

import random

import numpy as np
import torch

from setok.data.items import TrainItem
from setok.model import text as T
from setok.model.losses import patch_labels
from setok.model.setokim import (
    CAPTION_PROMPT,
    QUESTION_PROMPT,
    REFER_PROMPT,
    Sequence,
    Setokim,
)

QA_PER_IMAGE = 3  # of the 6 a scene has; short sequences, cheap once batches are length-bucketed
# Relations are the slowest questions to learn (left-of 0.48, above 0.64 when every kind was drawn
# alike, while existence reached 0.95): they are drawn this many times as often.
RELATION_WEIGHT = 3.0


def task_sequences(model: Setokim, it: TrainItem, tokens: torch.Tensor, assignment: torch.Tensor,
                   rng: random.Random) -> list[Sequence]:
    """The stage-2 sequences of one image: caption, QA_PER_IMAGE questions (relations drawn
    RELATION_WEIGHT times as often), one referring expression, generation."""
    eos = [model.ids[T.EOS]]
    enc = model.encode_text
    seqs = [model.prompt(tokens, CAPTION_PROMPT).add(enc(it.caption) + eos, True)]
    for q, a in weighted_sample(it.qa, [qa_weight(q) for q, _ in it.qa], QA_PER_IMAGE, rng):
        seqs.append(model.prompt(tokens, QUESTION_PROMPT, q=q).add(enc(a) + eos, True))
    if it.referring:
        expr, mask = rng.choice(it.referring)
        s = model.prompt(tokens, REFER_PROMPT, e=expr)
        s.seg_labels = token_labels(mask, assignment, tokens.shape[0], model.cfg.encoder.patch_size).to(tokens.device)
        seqs.append(s)
    k = tokens.shape[0]
    gen = model.generation_prefix(it.caption)
    gen.add([model.ids[T.IM_START]] + [model.ids[T.TARGET]] * k + [model.ids[T.IM_END]] + eos, True)
    order = generation_order(it, assignment, k, model.cfg.encoder.patch_size)
    gen.targets = tokens[order.to(tokens.device)].detach().float()  # a target, not a path for gradients into the merger
    seqs.append(gen)
    return seqs


def batch_sequences(model: Setokim, items: list[TrainItem], vt, rngs: list[random.Random]) -> list[Sequence]:
    """Every image's stage-2 sequences from its tokens in `vt` (the vision tokenizer's output for
    `items`), image i drawing from rngs[i]: the training step's and `setok finetune`'s one loop."""
    counts = vt.clusters.num_tokens.tolist()
    assignment = vt.clusters.assignment.cpu()  # the per-image bookkeeping runs on the host
    return [s for i, it in enumerate(items)
            for s in task_sequences(model, it, vt.tokens[i, : counts[i]], assignment[i], rngs[i])]


def qa_weight(question: str) -> float:
    return RELATION_WEIGHT if question.startswith("is the ") and (" left of " in question or " above " in question) else 1.0


def weighted_sample(items: list, weights: list[float], n: int, rng: random.Random) -> list:
    """Up to n items drawn without replacement, each draw proportional to the remaining weights."""
    pool, w, out = list(items), list(weights), []
    while pool and len(out) < n:
        i = rng.choices(range(len(pool)), weights=w)[0]
        out.append(pool.pop(i))
        w.pop(i)
    return out


def generation_order(it: TrainItem, assignment: torch.Tensor, k: int, patch: int) -> torch.Tensor:
    """The order the LLM emits an image's tokens in: objects in caption order, then background.

    The detokenizer reads a token set (no slot index, only each token's own centroid), so any
    order renders the same image; in raster order of centres the LLM would first have to work
    out which object (or background patch) each slot is. Instance ids follow the caption's
    order, so slot j <-> the j-th object described. Without masks: raster order.
    """
    if it.instance_mask is None:
        return torch.arange(k)
    labels = patch_labels(torch.from_numpy(it.instance_mask)[None], patch)[0]  # (N,)
    votes = torch.zeros(k, int(labels.max()) + 1).index_put_((assignment, labels), torch.ones(()), accumulate=True)  # (K, M+1)
    owner = votes.argmax(1).tolist()  # majority instance of each token (0 = background)
    key = [(o == 0, o, t) for t, o in enumerate(owner)]  # background last; ties keep raster order
    return torch.tensor(sorted(range(k), key=key.__getitem__))


def token_labels(mask: np.ndarray, assignment: torch.Tensor, k: int, patch: int) -> torch.Tensor:
    """A token belongs to a referred object when most of its patches lie inside the mask."""
    inside = patch_labels(torch.from_numpy(mask.astype(np.int64))[None], patch)[0].float()  # (N,)
    frac = torch.zeros(k).index_add_(0, assignment, inside) / torch.bincount(assignment, minlength=k).clamp_min(1)
    return (frac >= 0.5).long()
