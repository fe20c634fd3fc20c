"""The text tokenizer: BPE trained offline with `tokenizers`, saved as a fast tokenizer; or,
with `--llm DIR`, the LLM's own pretrained tokenizer with setok's three tokens added.

Metaspace pre-tokenization makes decode(encode(s)) == s exactly, which exact-match metrics
(caption_exact, vqa_accuracy) rely on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from setok.errors import CheckpointError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IM_START, IM_END, TARGET = "<im_start>", "<im_end>", "<target>"
SPECIAL = [PAD, BOS, EOS, UNK, IM_START, IM_END, TARGET]
ADDED = [IM_START, IM_END, TARGET]  # what setok adds to a pretrained tokenizer


def train_text_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a BPE tokenizer on `corpus`; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END, TARGET],
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
    )


def load_text_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; expected a checkpoint written by `setok train`")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def load_pretrained_tokenizer(path: str | Path):
    """The LLM directory's own tokenizer (local files only) with setok's tokens added as special."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--llm {path}: no usable tokenizer ({str(e).splitlines()[0]}); expected the LLM's "
                              "tokenizer files (tokenizer.json) in its directory") from None
    if not tok.is_fast:
        raise CheckpointError(f"--llm {path}: its tokenizer is not a fast (tokenizer.json) one, which the runtime needs")
    if tok.eos_token_id is None:
        raise CheckpointError(f"--llm {path}: its tokenizer has no EOS token; generation could never stop")
    tok.add_special_tokens({"additional_special_tokens": ADDED}, replace_additional_special_tokens=False)
    return tok


def special_ids(tok) -> dict[str, int]:
    """setok's token roles -> ids. A pretrained tokenizer keeps its own special tokens: <bos> is
    its BOS (its EOS where it has none, as GPT-2-style models start documents), <pad> and <unk>
    fall back to EOS too. For setok's own BPE these are its tokens of those names."""
    eos = tok.eos_token_id
    ids = {PAD: tok.pad_token_id, BOS: tok.bos_token_id, EOS: eos, UNK: tok.unk_token_id}
    ids = {k: eos if v is None else int(v) for k, v in ids.items()}
    return ids | {t: int(tok.convert_tokens_to_ids(t)) for t in ADDED}


def grow_vocab(llm, tok) -> None:
    """Make room for the tokens the tokenizer has beyond the LLM's pretrained ones and initialise
    only their rows (input embedding and LM head) to the mean of the pretrained rows."""
    import torch

    added = [int(tok.convert_tokens_to_ids(t)) for t in ADDED]
    known = min(added)  # the pretrained tokenizer's size: setok's tokens come right after it
    if len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    weights = {w.data_ptr(): w for w in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)}
    with torch.no_grad():
        for w in weights.values():  # once each: a tied LM head is the embedding itself
            w[added] = w[:known].mean(0)


def plain_config(llm) -> dict:
    """The LLM's config as a JSON-safe dict, to rebuild it without its directory."""
    from setok.model.families import plain

    return plain(llm.config.to_dict())
