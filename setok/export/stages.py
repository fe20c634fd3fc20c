"""The stage registry: every exported stage as data.

A `Stage` carries everything about itself: its tensor specs (from the model's configs; the LLM's
from its own config), the example inputs it is validated on, its exporter and validator, its
tolerance, whether it may be quantized, and what the manifest says of it to the runtime (an
alternative `form_of` another stage, a custom op, extra records such as the KV-cache names).
Export, validation and calibration iterate over this registry; the runtime, TensorRT and Triton
read what it wrote into the bundle's manifest. No other module keeps a list of stages.

A reader finds a stage by its name in every layer: `model/merger.py`, the `merger` entry here,
`merger` in the manifest, `stage("merger")` in the runtime.

Importable without torch: the torch-side callables (modules, exporters, validators, examples)
import what they need when they are called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from setok import manifest as M

if TYPE_CHECKING:
    from torch import Tensor, nn

    from setok.config import SetokimConfig
    from setok.model.cluster import Clusters
    from setok.model.setokim import Setokim

Specs = tuple[list[M.TensorSpec], list[M.TensorSpec]]


@dataclass(frozen=True)
class Tolerance:
    cosine: float = 0.99999  # minimum cosine similarity of float outputs
    norm_ratio: float = 1e-4  # |norm(onnx) / norm(torch) - 1| at most
    max_abs: float | None = None  # optional absolute bound
    int_match: float = 1.0  # fraction of identical integer outputs


# `setok export --dtype fp16`, against the fp32 PyTorch module on the same example: float16 keeps
# 11 mantissa bits (relative error ~5e-4 per op), so a deep graph drifts by ~1e-3 in cosine terms.
HALF_TOLERANCE = Tolerance(cosine=0.999, norm_ratio=5e-3)


@dataclass
class Flow:
    """Held-out scenes flowing through the torch stages: what every stage's example is cut from."""

    pixel_values: Tensor  # (B, 3, S, S)
    features: Tensor  # (B, N, C)
    clusters: Clusters
    tokens: Tensor  # (B, T, D), zero beyond num_tokens
    hidden: Tensor  # (B, K, H) LLM-width states (random: the heads are linear in them)

    @property
    def k(self) -> int:
        """Vision tokens of the first image."""
        return int(self.clusters.num_tokens[0])


def lazy(target: str) -> Callable[..., Any]:
    """`module:function`, imported on the first call (keeps this registry free of torch)."""
    module, name = target.split(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


TRACE = lazy("setok.export.onnx:export_module")  # torch.onnx.export of the stage's module
COMPARE = lazy("setok.export.validate:validate_module")  # ONNX Runtime against the module, per output


def _always(cfg: SetokimConfig) -> bool:
    return True


def _no_record(model: Setokim) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    specs: Callable[[Setokim], Specs]  # (inputs, outputs) in graph order
    example: Callable[[Flow], dict[str, Tensor]]  # what the validator feeds both sides
    module: Callable[[Setokim], nn.Module]  # the PyTorch reference (what the default exporter traces)
    export: Callable[..., Path] = TRACE  # (stage, model, out_dir, opset, example) -> the written file
    validate: Callable[..., list] = COMPARE  # (stage, model, path, example) -> comparisons, or ValidationError
    tolerance: Tolerance = field(default_factory=Tolerance)
    applies: Callable[[SetokimConfig], bool] = _always
    quantize: bool = True  # may `setok calibrate` give it INT8 weights / Q/DQ
    float_reason: str = ""  # why not, when it may not
    half: bool = True  # may `setok export --dtype fp16` give it float16 weights (else it stays fp32)
    half_tolerance: Tolerance = HALF_TOLERANCE
    form_of: str | None = None  # another graph of that stage: the runtime and TensorRT pick one
    custom_op: M.CustomOp | None = None  # a non-standard op in the graph (plugin)
    files: tuple[tuple[str, str], ...] = ()  # (manifest role, file) its exporter writes beside the graph
    record: Callable[[Setokim], dict[str, Any]] = _no_record  # more of its manifest `extra`
    # (stage, model, path) -> manifest extras: rewrite the exported graph's attention as ONNX Runtime's
    # fused GroupQueryAttention (`setok export --llm-attention gqa`); None: the stage has no attention.
    fuse_attention: Callable[..., Any] | None = None
    # (stage, model, path) -> manifest extras: the eager graph's logits for each row's newest token
    # only (`setok export --llm-logits newest`); None: the stage has no LM head.
    newest_logits: Callable[..., Any] | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def extra(self, model: Setokim) -> dict[str, Any]:
        """The manifest entry's `extra`: the custom op it holds and the stage's own records."""
        return {**(self.custom_op.record() if self.custom_op else {}), **self.record(model)}


STAGES: dict[str, Stage] = {}


def register(stage: Stage, registry: dict[str, Stage] | None = None) -> Stage:
    """Add `stage` (to `registry`, default the package's; tests register toy stages on a copy)."""
    registry = STAGES if registry is None else registry
    if stage.name in registry:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    registry[stage.name] = stage
    return stage


def stage(name: str) -> Stage:
    return STAGES[name]


# ---- specs: (dtype, shape) per tensor; shapes from the model (ints fixed, strings symbolic) -------
ShapeFn = Callable[["Setokim"], tuple]


def io(inputs: dict[str, tuple[str, ShapeFn]], outputs: dict[str, tuple[str, ShapeFn]]) -> Callable[[Setokim], Specs]:
    def specs(model: Setokim) -> Specs:
        return tuple([M.TensorSpec(n, dt, list(shape(model))) for n, (dt, shape) in d.items()]
                     for d in (inputs, outputs))
    return specs


F32, I64 = "float32", "int64"


def _img(m: Setokim) -> tuple:
    return ("batch", 3, m.cfg.encoder.image_size, m.cfg.encoder.image_size)


def _feat(m: Setokim) -> tuple:
    return ("batch", "num_patches", m.cfg.encoder.width)


def _patches(m: Setokim) -> tuple:
    return ("batch", m.cfg.encoder.num_patches, m.cfg.encoder.width)


def _ids(m: Setokim) -> tuple:
    return ("batch", "num_patches")


def _count(m: Setokim) -> tuple:
    return ("batch",)


def _padded(m: Setokim) -> tuple:
    return ("batch", m.cfg.max_tokens, m.cfg.merger.token_dim)


def _tokens(m: Setokim) -> tuple:
    return ("tokens", m.cfg.merger.token_dim)


def _centers(m: Setokim) -> tuple:
    return ("batch", m.cfg.max_tokens)


def _hidden(m: Setokim) -> tuple:
    return ("tokens", m.llm.config.hidden_size)  # the LLM's own width, whatever its family


def _query(m: Setokim) -> tuple:
    return ("batch", m.llm.config.hidden_size)


def _token_hidden(m: Setokim) -> tuple:
    return ("batch", "tokens", m.llm.config.hidden_size)


def _seg(m: Setokim) -> tuple:
    return ("batch", "tokens")


CLUSTER_IO = io({M.PATCH_FEATURES: (F32, _feat)},
                {M.ASSIGNMENT: (I64, _ids), M.NUM_TOKENS: (I64, _count), M.CENTERS: (I64, _centers)})
CLUSTER_FLOAT = "stays float: integer-exact clustering"


def _cluster_module(m: Setokim) -> nn.Module:
    from setok.model.vision import ClusterOutputs

    return ClusterOutputs(m.vision)


def _seg_module(m: Setokim) -> nn.Module:
    from setok.model.setokim import SegHead

    return SegHead(m)


def _is_setok(cfg: SetokimConfig) -> bool:
    return cfg.tokenizer == "setok"  # the plugin implements DPC-KNN, not the baselines' tokenizers


register(Stage("encoder", io({M.PIXEL_VALUES: (F32, _img)}, {M.PATCH_FEATURES: (F32, _patches)}),
               lambda f: {M.PIXEL_VALUES: f.pixel_values}, lambda m: m.vision.encoder))
register(Stage("cluster", CLUSTER_IO, lambda f: {M.PATCH_FEATURES: f.features}, _cluster_module,
               quantize=False, float_reason=CLUSTER_FLOAT, half=False))
register(Stage("cluster_plugin", CLUSTER_IO, lambda f: {M.PATCH_FEATURES: f.features}, _cluster_module,
               export=lazy("setok.export.cluster:export_plugin_stage"), applies=_is_setok, quantize=False,
               float_reason=CLUSTER_FLOAT, half=False, form_of="cluster", custom_op=M.CLUSTER_OP))
register(Stage("merger", io({M.PATCH_FEATURES: (F32, _feat), M.ASSIGNMENT: (I64, _ids), M.NUM_TOKENS: (I64, _count)},
                            {M.VISION_TOKENS: (F32, _padded)}),
               lambda f: {M.PATCH_FEATURES: f.features, M.ASSIGNMENT: f.clusters.assignment,
                          M.NUM_TOKENS: f.clusters.num_tokens},
               lambda m: m.vision.merger))
register(Stage("projector", io({M.VISION_TOKENS: (F32, _tokens)}, {M.EMBEDS: (F32, _hidden)}),
               lambda f: {M.VISION_TOKENS: f.tokens[0, :f.k]}, lambda m: m.projector))
# The llm's validator draws its own inputs (a padded prefill, then a decode step on the cache).
register(Stage("llm", lazy("setok.export.llm:llm_specs"), lambda f: {}, lambda m: m.llm,
               export=lazy("setok.export.llm:export_llm_stage"), validate=lazy("setok.export.validate:validate_llm_stage"),
               # Logits and last hidden state, prefill and one decode step (max_abs: logits only).
               tolerance=Tolerance(cosine=0.9999, norm_ratio=1e-3, max_abs=1e-3),
               half_tolerance=Tolerance(cosine=0.999, norm_ratio=1e-2),
               files=(("embeddings", "llm_embeddings.npy"), ("tokenizer", "tokenizer.json")),
               record=lazy("setok.export.llm:llm_record"), fuse_attention=lazy("setok.export.llm:fuse_llm_attention"),
               newest_logits=lazy("setok.export.llm:newest_llm_logits")))
register(Stage("regress_head", io({M.HIDDEN: (F32, _hidden)}, {M.VISION_TOKENS: (F32, _tokens)}),
               lambda f: {M.HIDDEN: f.hidden[0]}, lazy("setok.model.setokim:TokenHead")))
register(Stage("seg_head", io({M.QUERY_HIDDEN: (F32, _query), M.TOKEN_HIDDEN: (F32, _token_hidden)},
                              {M.SEG_LOGITS: (F32, _seg)}),
               lambda f: {M.QUERY_HIDDEN: f.hidden[:, 0], M.TOKEN_HIDDEN: f.hidden}, _seg_module))
register(Stage("detokenizer", io({M.VISION_TOKENS: (F32, _padded), M.NUM_TOKENS: (I64, _count)}, {M.IMAGE: (F32, _img)}),
               lambda f: {M.VISION_TOKENS: f.tokens, M.NUM_TOKENS: f.clusters.num_tokens},
               lambda m: m.vision.detokenizer))


# ---- the examples: real scenes through the torch stages before ---------------------------------
def flow(model: Setokim, n: int = 2, seed: int = 11) -> Flow:
    """Held-out scenes through encoder, cluster and merger (no gradient)."""
    import numpy as np
    import torch

    from setok.data.items import eval_items
    from setok.model.encoder import preprocess

    with torch.no_grad():
        images = np.stack([it.image for it in eval_items(n, seed, model.cfg.encoder.image_size)])
        px = preprocess(torch.from_numpy(images), model.cfg.encoder)
        feats = model.vision.encoder(px)
        c = model.vision.cluster(feats)
        tokens = model.vision.merger(feats, c.assignment, c.num_tokens)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, int(c.num_tokens[0]), model.llm.config.hidden_size, generator=g)
    return Flow(px, feats, c, tokens, hidden)
