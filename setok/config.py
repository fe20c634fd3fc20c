"""Typed configs for every component; importable without torch (the runtime reads them too).

A checkpoint's `config.json` is `SetokimConfig.to_dict()`; `from_dict` refuses unknown keys so a
typo in a hand-edited config fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setok.errors import InputError


@dataclass
class EncoderConfig:
    image_size: int = 64
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    # The clustering sees LayerNorm-ed features plus a sin/cos position code scaled by this:
    # without the normalisation, feature drift during training collapses the token count.
    pos_scale: float = 0.7
    # A local Hugging Face vision model directory to use instead of the built-in ViT (its weights
    # start training); its config is stored in `hf_config`, so a checkpoint needs no directory.
    hf_path: str | None = None
    hf_config: dict[str, Any] | None = None
    # The tower's input normalisation (its image processor's; the built-in ViT's is 0.5 / 0.5).
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # Trained with the tower frozen (SeTok trains the tokenizer on a frozen tower).
    freeze: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class ClusterConfig:
    k: int = 8
    tau: float = 0.25
    min_tokens: int = 2
    max_tokens: int = 32


@dataclass
class MergerConfig:
    inner_depth: int = 1
    inter_depth: int = 1
    heads: int = 4
    token_dim: int = 128  # D, the width of a vision token
    # Add each patch's offset from its cluster's centroid (Fourier features) before the inner
    # transformer: the masked mean then carries a translation-invariant shape signature. Without
    # it a linear probe recovers an object's shape from its token at 0.44 (5 shapes).
    shape_code: bool = True


@dataclass
class DetokenizerConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    # Each token's attention footprint gets a shape (a field over its patches' offsets from its
    # centroid, read from the token) instead of the locality prior's disc alone. Off: every object
    # was drawn as a round blob (recon_shape 0.28; docs/generation.md "The shape field"). False for
    # checkpoints from before; the presets turn it on.
    shape_field: bool = False
    # A discrete decoder beside the regression: per pixel, logits over background + `palette` colour
    # codes (k-means over training scenes' object pixels, learned from the data), and the image is the
    # regression where background wins and a code's colour elsewhere. An MSE-only head hedges between
    # colours at edges it is unsure of, and those blended fringes read as extra objects (recon_count
    # 0.64; docs/generation.md "A discrete colour decoder"). 0: regression only.
    palette: int = 0


@dataclass
class LLMConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    vocab_size: int = 512  # upper bound for the trained text tokenizer
    # A local causal-LM directory to use instead of building a Llama from this config (its weights
    # and tokenizer start training); its config (vocabulary grown by setok's tokens) is stored in
    # `hf_config`, so a checkpoint needs no directory.
    hf_path: str | None = None
    hf_config: dict[str, Any] | None = None


@dataclass
class SetokimConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
    detokenizer: DetokenizerConfig = field(default_factory=DetokenizerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # "setok" (DPC-KNN clusters), "patch" (every patch is a token), "topk" (fixed K centers).
    tokenizer: str = "setok"
    topk_tokens: int = 16
    # A head that places each generated token: one of the 3x3 cells, then (x, y) within it, in place
    # of the regressed dims 0-1 (MSE alone put every object near the centre; docs/generation.md).
    # `setok train --place-head`; off for checkpoints saved before it existed and, until a shipped
    # checkpoint is retrained with it, in the presets.
    place_head: bool = False
    # Real tokens of training scenes that each generated token's content snaps to (its nearest; the
    # regression alone gives averaged, blended objects; setok/model/bank.py). The number of tokens;
    # 0: none. Set from data by `setok bank` or `setok train --token-bank N`, never by a preset.
    token_bank: int = 0
    # Each <target> slot after the first also reads the token generated at the slot before it
    # (through the projector, added to the <target> embedding): without it every slot is a function
    # of the caption and its index alone, blind to what was drawn (docs/generation.md).
    gen_feedback: bool = False
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SetokimConfig:
        return _build(cls, data, "config")

    @property
    def max_tokens(self) -> int:
        """The most vision tokens one image can produce under this config."""
        if self.tokenizer == "patch":
            return self.encoder.num_patches
        if self.tokenizer == "topk":
            return self.topk_tokens
        return self.cluster.max_tokens


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _SUBCONFIGS.get(fields[name].type if isinstance(fields[name].type, str) else "")
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_SUBCONFIGS = {
    "EncoderConfig": EncoderConfig,
    "ClusterConfig": ClusterConfig,
    "MergerConfig": MergerConfig,
    "DetokenizerConfig": DetokenizerConfig,
    "LLMConfig": LLMConfig,
}


# The checkpoint shipped inside the package (`setok demo`'s default, `setok train --preset small`).
SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "small"

# The presets as a table (litgpt's `configs`): each row overrides SetokimConfig's defaults.
# `tiny` trains in under a minute (tests); `small` is the shipped one (the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "encoder": {"width": 32, "depth": 1, "heads": 2},
        "cluster": {"k": 8, "tau": 0.25, "min_tokens": 2, "max_tokens": 16},
        "merger": {"heads": 2, "token_dim": 32},
        "detokenizer": {"width": 32, "depth": 1, "heads": 2, "shape_field": True},
        "llm": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
    },
    "small": {"detokenizer": {"shape_field": True}},
}
TOKENIZERS = ("setok", "patch", "topk")


def preset(name: str, tokenizer: str = "setok") -> SetokimConfig:
    """The named model size (a row of PRESETS) with the given tokenizer."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    if tokenizer not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {tokenizer!r}; expected one of {list(TOKENIZERS)}")
    cfg = SetokimConfig.from_dict(copy.deepcopy({**PRESETS[name], "tokenizer": tokenizer, "preset": name}))
    # The LLM's context must hold every vision token plus the longest prompt: the patch
    # baseline feeds all N patches (RoPE has no learned positions, so this changes no weight).
    cfg.llm.max_position_embeddings = max(cfg.llm.max_position_embeddings, cfg.max_tokens + 128)
    return cfg
