"""The Hugging Face families setok assembles a Setokim from: vision towers and decoder LLMs,
each keyed by its config's `model_type` (optimum's way).

A family says how to build the module from its config alone — a checkpoint stores the tower's
and the LLM's configs, so loading needs nothing but the checkpoint directory — and what it
brings along: a tower's normalisation constants and patch grid, an LLM's optimum ONNX config.
Built from configs only: no hub access, no remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setok.errors import CheckpointError, InputError

# Normalisation constants of the image processors these families ship with (transformers'
# IMAGENET_STANDARD_*, IMAGENET_DEFAULT_*, OPENAI_CLIP_*); a directory's own
# preprocessor_config.json overrides them.
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class VisionFamily:
    model_type: str
    model_class: str  # a transformers class whose output has `last_hidden_state` (B, prefix + N, H)
    norm: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) of its image processor
    kwargs: tuple[tuple[str, Any], ...] = ()  # for the class: what setok does not use is not built


@dataclass(frozen=True)
class LLMFamily:
    model_type: str
    onnx_config: str  # optimum.exporters.onnx.model_configs class for text-generation-with-past


VISION_FAMILIES = {f.model_type: f for f in (
    VisionFamily("vit", "ViTModel", HALF, (("add_pooling_layer", False),)),
    VisionFamily("siglip_vision_model", "SiglipVisionModel", HALF),
    VisionFamily("clip_vision_model", "CLIPVisionModel", CLIP),
    VisionFamily("dinov2", "Dinov2Model", IMAGENET),
)}
# A full SigLIP / CLIP directory (text + vision): its vision half is the tower.
COMPOSITE = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}

LLM_FAMILIES = {f.model_type: f for f in (
    LLMFamily("llama", "LlamaOnnxConfig"),  # also SmolLM, TinyLlama
    LLMFamily("mistral", "MistralOnnxConfig"),
    LLMFamily("qwen2", "Qwen2OnnxConfig"),  # Qwen2 and Qwen2.5
    LLMFamily("qwen3", "Qwen3OnnxConfig"),
    LLMFamily("phi3", "Phi3OnnxConfig"),
    LLMFamily("gemma", "GemmaOnnxConfig"),
    LLMFamily("gemma2", "Gemma2OnnxConfig"),
    LLMFamily("gemma3_text", "Gemma3TextOnnxConfig"),
)}


def _family(table: dict, model_type: str, what: str):
    if model_type not in table:
        raise InputError(f"{what} model_type {model_type!r} is not supported; supported: {sorted(table)}")
    return table[model_type]


def vision_family(model_type: str) -> VisionFamily:
    return _family(VISION_FAMILIES, model_type, "vision tower")


def llm_family(model_type: str) -> LLMFamily:
    return _family(LLM_FAMILIES, model_type, "LLM")


# ---- configs: from a directory once (training), from the checkpoint ever after --------------------
def read_config(path: str | Path, what: str) -> dict[str, Any]:
    """A local model directory's config as a plain dict (JSON-safe), refusing what is not one."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{what} {path}: no config.json; expected a local Hugging Face model directory")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if config.model_type in COMPOSITE:
        config = config.vision_config
    return plain(config.to_dict())


def plain(d: dict[str, Any]) -> dict[str, Any]:
    """Drop what JSON cannot hold or a from-config rebuild must not see (dtype objects, paths)."""
    import json

    d = {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version")}
    return json.loads(json.dumps(d, default=str))


def config_object(d: dict[str, Any]):
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def image_norm(path: str | Path | None, family: VisionFamily) -> tuple[list[float], list[float]]:
    """(mean, std): the directory's preprocessor_config.json if it has one, else the family's."""
    import json

    pre = Path(path) / "preprocessor_config.json" if path else None
    if pre is not None and pre.is_file():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return [float(x) for x in d["image_mean"]], [float(x) for x in d["image_std"]]
    return list(family.norm[0]), list(family.norm[1])


# ---- modules -----------------------------------------------------------------------------------
def build_vision(config: dict[str, Any], pretrained: str | None = None):
    """The tower from its config (random weights: a checkpoint's load follows), or with the
    weights of the local directory `pretrained` (the start of training)."""
    import transformers

    family = vision_family(config["model_type"])
    cls, kwargs = getattr(transformers, family.model_class), dict(family.kwargs)
    if pretrained:
        return cls.from_pretrained(pretrained, local_files_only=True, trust_remote_code=False, **kwargs)
    return cls(config_object(config), **kwargs)


def build_causal_lm(config: dict[str, Any], pretrained: str | None = None):
    from transformers import AutoModelForCausalLM

    llm_family(config["model_type"])  # refuse an unsupported family before building anything
    if pretrained:
        return AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True, trust_remote_code=False)
    return AutoModelForCausalLM.from_config(config_object(config))


def require_dir(path: str | None, what: str) -> str:
    """Checkpoints written before their configs were stored point at the directory they came from."""
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"the checkpoint names the {what} directory {path!r}, which is not there, and holds no "
                              "config of its own (written by an older setok): retrain it with this version")
    return path


def set_attention(llm, impl: str | None) -> str | None:
    """Switch a Hugging Face model's attention implementation, returning the previous one (to
    restore afterwards); None leaves it as it is."""
    before = getattr(llm.config, "_attn_implementation", None)
    if impl is None or impl == before:
        return before
    if hasattr(llm, "set_attn_implementation"):  # transformers >= 4.56
        llm.set_attn_implementation(impl)
    else:
        llm.config._attn_implementation = impl
    return before
