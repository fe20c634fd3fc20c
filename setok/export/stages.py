"""The stage registry: every exported stage as data (names, shapes, module, example, tolerance).

A reader finds a stage by its name in every layer: `model/merger.py`, the `merger` entry here,
`merger` in the manifest, `stage("merger")` in the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from setok import manifest as M
from setok.config import SetokimConfig

if TYPE_CHECKING:
    from setok.model.setokim import Setokim

Shape = tuple  # of int (fixed) or str (symbolic)


@dataclass(frozen=True)
class Tolerance:
    cosine: float = 0.99999  # minimum cosine similarity of float outputs
    norm_ratio: float = 1e-4  # |norm(onnx) / norm(torch) - 1| at most
    max_abs: float | None = None  # optional absolute bound
    int_match: float = 1.0  # fraction of identical integer outputs


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: dict[str, tuple[str, Callable[[SetokimConfig], Shape]]]  # name -> (dtype, shape)
    outputs: dict[str, tuple[str, Callable[[SetokimConfig], Shape]]]
    module: Callable[[Setokim], nn.Module] | None  # None: the stage has its own exporter
    tolerance: Tolerance = field(default_factory=Tolerance)
    applies: Callable[[SetokimConfig], bool] = lambda cfg: True

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def specs(self, cfg: SetokimConfig, which: str) -> list[M.TensorSpec]:
        decl = self.inputs if which == "inputs" else self.outputs
        return [M.TensorSpec(n, dt, list(shape(cfg))) for n, (dt, shape) in decl.items()]


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


def stage(name: str) -> Stage:
    return STAGES[name]


# ---- the torch modules each stage exports -------------------------------------------------
class ClusterStage(nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, patch_features: Tensor):
        c = self.vision.cluster(patch_features)
        return c.assignment, c.num_tokens, c.centers


class SegHead(nn.Module):
    """Score each vision token's hidden state against the expression's last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.q, self.k = model.seg_query, model.seg_key

    def forward(self, query_hidden: Tensor, token_hidden: Tensor) -> Tensor:
        q = self.q(query_hidden).unsqueeze(-1)  # (B, H, 1)
        return (self.k(token_hidden) @ q).squeeze(-1) / q.shape[1] ** 0.5  # (B, K)


# ---- shapes -------------------------------------------------------------------------------
def _img(cfg):
    return ("batch", 3, cfg.encoder.image_size, cfg.encoder.image_size)


def _feat(cfg):
    return ("batch", "num_patches", cfg.encoder.width)


def _ids(cfg):
    return ("batch", "num_patches")


def _tokens(cfg):
    return ("batch", cfg.max_tokens, cfg.merger.token_dim)


def _hidden_size(cfg):
    return cfg.llm.hidden_size


F32, I64 = "float32", "int64"

register(Stage("encoder", {M.PIXEL_VALUES: (F32, _img)},
               {M.PATCH_FEATURES: (F32, lambda c: ("batch", c.encoder.num_patches, c.encoder.width))},
               lambda m: m.vision.encoder))
register(Stage("cluster", {M.PATCH_FEATURES: (F32, _feat)},
               {M.ASSIGNMENT: (I64, _ids), M.NUM_TOKENS: (I64, lambda c: ("batch",)),
                M.CENTERS: (I64, lambda c: ("batch", c.max_tokens))},
               lambda m: ClusterStage(m.vision)))
register(Stage("cluster_plugin", dict(STAGES["cluster"].inputs), dict(STAGES["cluster"].outputs), None,
               applies=lambda cfg: cfg.tokenizer == "setok"))
register(Stage("merger", {M.PATCH_FEATURES: (F32, _feat), M.ASSIGNMENT: (I64, _ids), M.NUM_TOKENS: (I64, lambda c: ("batch",))},
               {M.VISION_TOKENS: (F32, _tokens)}, lambda m: m.vision.merger))
register(Stage("projector", {M.VISION_TOKENS: (F32, lambda c: ("tokens", c.merger.token_dim))},
               {M.EMBEDS: (F32, lambda c: ("tokens", _hidden_size(c)))}, lambda m: m.projector))
register(Stage("llm", {}, {}, None, tolerance=Tolerance(cosine=0.9999, norm_ratio=1e-3)))
register(Stage("regress_head", {M.HIDDEN: (F32, lambda c: ("tokens", _hidden_size(c)))},
               {M.VISION_TOKENS: (F32, lambda c: ("tokens", c.merger.token_dim))}, lambda m: m.regress))
register(Stage("seg_head", {M.QUERY_HIDDEN: (F32, lambda c: ("batch", _hidden_size(c))),
                            M.TOKEN_HIDDEN: (F32, lambda c: ("batch", "tokens", _hidden_size(c)))},
               {M.SEG_LOGITS: (F32, lambda c: ("batch", "tokens"))}, SegHead))
register(Stage("detokenizer", {M.VISION_TOKENS: (F32, _tokens), M.NUM_TOKENS: (I64, lambda c: ("batch",))},
               {M.IMAGE: (F32, _img)}, lambda m: m.vision.detokenizer))


# ---- example inputs: real scenes through the torch stages before ----------------------------
@torch.no_grad()
def examples(model, n: int = 2, seed: int = 11) -> dict[str, dict[str, Tensor]]:
    """Inputs for every torch-exported stage, from held-out scenes flowing through the model."""
    from setok.data.items import eval_items
    from setok.model.encoder import preprocess

    px = preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(n, seed, model.cfg.encoder.image_size)])))
    feats = model.vision.encoder(px)
    c = model.vision.cluster(feats)
    tokens = model.vision.merger(feats, c.assignment, c.num_tokens)
    k = int(c.num_tokens[0])
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, k, model.llm.config.hidden_size, generator=g)
    return {
        "encoder": {M.PIXEL_VALUES: px},
        "cluster": {M.PATCH_FEATURES: feats},
        "merger": {M.PATCH_FEATURES: feats, M.ASSIGNMENT: c.assignment, M.NUM_TOKENS: c.num_tokens},
        "projector": {M.VISION_TOKENS: tokens[0, :k]},
        "regress_head": {M.HIDDEN: hidden[0]},
        "seg_head": {M.QUERY_HIDDEN: hidden[:, 0], M.TOKEN_HIDDEN: hidden},
        "detokenizer": {M.VISION_TOKENS: tokens, M.NUM_TOKENS: c.num_tokens},
    }
