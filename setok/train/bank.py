"""The token bank from data (`SetokimConfig.token_bank`, setok/model/bank.py): a trained model's own
vision tokens of a fixed set of training scenes, `size` of them drawn at random. Built after
training, from the final vision tokenizer (`--tune-merger` changes the tokens in stage 2)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from setok.data.items import item_stream
from setok.errors import InputError
from setok.model.bank import TokenBank
from setok.model.encoder import preprocess

log = logging.getLogger(__name__)

BANK_SCENES = 2000  # measured: 2,000 scenes (~20,600 tokens) and 6,000 scoring alike (docs/generation.md)
BANK_SIZE = 16384
_BATCH = 100
_FIRST_BATCH = 2 * 10**6  # a fixed set of training seeds, apart from the tau and palette scenes


@torch.no_grad()
def bank_tokens(model, stream, size: int = BANK_SIZE, scenes: int = BANK_SCENES, seed: int = 0,
                strict: bool = True) -> torch.Tensor:
    """(size, D - 2): the content (dims 2:) of `size` tokens drawn from `scenes` training scenes.
    Fewer tokens than `size` there: an error, or (not strict: at the end of a training run) all of them."""
    from tqdm.auto import tqdm

    if size < 1 or scenes < 1:
        raise InputError(f"token bank of {size} tokens from {scenes} scenes: expected both >= 1")
    if strict and size > scenes * model.cfg.max_tokens:
        raise InputError(f"token bank of {size} tokens: {scenes} scenes give at most {scenes * model.cfg.max_tokens} "
                         f"({model.cfg.max_tokens} per image); expected more scenes (--scenes) or a smaller --size")
    was_training = model.training
    model.eval()
    enc, device, found = model.cfg.encoder, model.device, []
    for i in tqdm(range(0, scenes, _BATCH), desc="token bank", unit="batch", dynamic_ncols=True):
        items = stream.batch(_FIRST_BATCH + i // _BATCH, min(_BATCH, scenes - i))
        px = preprocess(torch.from_numpy(np.stack([it.image for it in items])), enc).to(device)
        vt = model.vision(px)
        found += [t[:k, 2:].float().cpu() for t, k in zip(vt.tokens, vt.clusters.num_tokens.tolist())]
    model.train(was_training)
    pool = torch.cat(found)  # (sum of tokens, D - 2)
    if len(pool) < size and not strict:
        log.warning("token bank: %d scenes gave %d tokens, fewer than %d: keeping them all", scenes, len(pool), size)
        size = len(pool)
    if len(pool) < size:
        raise InputError(f"token bank of {size} tokens: {scenes} scenes gave only {len(pool)}; "
                         "expected more scenes (--scenes) or a smaller --size")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]
    log.info("token bank: %d of %d tokens from %d scenes", size, len(pool), scenes)
    return pool[pick]


def attach_bank(model, tokens: torch.Tensor) -> None:
    """Give `model` a bank of these tokens (its config records the size, so a checkpoint reloads it)."""
    model.cfg.token_bank = len(tokens)
    model.bank = TokenBank(len(tokens), model.cfg.merger.token_dim).to(model.device)
    model.bank.fill(tokens.to(model.device))


def add_bank(ckpt: Path, out: Path | None = None, data: str = "synthetic", size: int = BANK_SIZE,
             scenes: int = BANK_SCENES, seed: int = 0, device: str = "cpu") -> Path:
    """`setok bank`: a checkpoint with a token bank built from its own training data (seed: the
    training stream's; a bank already there is replaced). Written atomically to `out` (default: in place)."""
    import json

    from setok.model.setokim import Setokim
    from setok.train.distributed import Dist, train_device

    dev = train_device(device, Dist())  # the user's --device checked before the checkpoint is read
    model = Setokim.from_pretrained(ckpt).to(dev)
    stream = item_stream(data, model.cfg.encoder.image_size, seed)
    attach_bank(model, bank_tokens(model, stream, size, scenes, seed))
    model.cpu()
    state = ckpt / "training_state.json"
    extra = json.loads(state.read_text()) if state.is_file() else None
    out = out or ckpt
    model.save_pretrained(out, extra=extra)
    return out
