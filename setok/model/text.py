"""The text tokenizer: BPE trained offline with `tokenizers`, saved as a fast tokenizer.

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
