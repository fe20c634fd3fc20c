"""`setok export`: one ONNX file per stage plus manifest.json, written atomically.

export_stage writes one file; validate_stage (validate.py) checks it; export_bundle composes
them and the manifest. Each can be called alone.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

import setok
from setok import manifest as M
from setok.export.cluster import export_cluster_plugin
from setok.export.llm import LLM_INPUTS, LLM_OUTPUTS, expand_names, export_llm
from setok.export.stages import STAGES, Stage, examples
from setok.io import atomic_dir
from setok.model.encoder import MEAN, STD
from setok.model.setokim import (
    CAPTION_PROMPT,
    DRAW_PROMPT,
    QUESTION_PROMPT,
    REFER_PROMPT,
    Setokim,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def _dynamic_axes(stage: Stage, cfg) -> dict[str, dict[int, str]]:
    axes = {}
    for spec in stage.specs(cfg, "inputs") + stage.specs(cfg, "outputs"):
        sym = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        if sym:
            axes[spec.name] = sym
    return axes


def export_stage(stage: Stage, model: Setokim, out_dir: Path, opset: int, example: dict | None) -> Path:
    """Write `out_dir/<stage>.onnx`; returns its path."""
    path = Path(out_dir) / stage.file
    cfg = model.cfg
    if stage.module is None:  # stages with an exporter of their own
        return OWN_EXPORTERS[stage.name](model, Path(out_dir), opset)
    module = stage.module(model).eval()
    args = tuple(example[name] for name in stage.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=list(stage.inputs), output_names=list(stage.outputs),
                          dynamic_axes=_dynamic_axes(stage, cfg), opset_version=opset, dynamo=False)
    _declare_shapes(path, stage, cfg)
    return path


def _export_llm(model: Setokim, out_dir: Path, opset: int) -> Path:
    """The LLM through optimum, plus what the runtime needs beside it: embeddings, tokenizer."""
    path = export_llm(model.llm, Path(out_dir), opset)
    emb = model.llm.get_input_embeddings().weight.detach().numpy().astype(np.float32)
    np.save(Path(out_dir) / "llm_embeddings.npy", emb)
    model.tok.backend_tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    return path


def _export_plugin(model: Setokim, out_dir: Path, opset: int) -> Path:
    return export_cluster_plugin(model.cfg.cluster, out_dir / "cluster_plugin.onnx", opset)


OWN_EXPORTERS = {"llm": _export_llm, "cluster_plugin": _export_plugin}


def _declare_shapes(path: Path, stage: Stage, cfg) -> None:
    """Write the registry's fixed dims into the graph's I/O (the tracer names some after ops)."""
    m = onnx.load(str(path))
    specs = {s.name: s for s in stage.specs(cfg, "inputs") + stage.specs(cfg, "outputs")}
    for value in list(m.graph.input) + list(m.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.shape):
            dim.Clear()
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want
    onnx.save(m, str(path))


def llm_specs(model: Setokim) -> tuple[list[M.TensorSpec], list[M.TensorSpec]]:
    c = model.llm.config
    heads, hd = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    past = ["batch", heads, "past_sequence", hd]
    present = ["batch", heads, "total_sequence", hd]
    ins = [M.TensorSpec("inputs_embeds", "float32", ["batch", "sequence", c.hidden_size]),
           M.TensorSpec("attention_mask", "int64", ["batch", "total_sequence"]),
           M.TensorSpec("position_ids", "int64", ["batch", "sequence"])]
    ins += [M.TensorSpec(n, "float32", past) for n in expand_names(LLM_INPUTS, c.num_hidden_layers)[3:]]
    outs = [M.TensorSpec("logits", "float32", ["batch", "sequence", c.vocab_size]),
            M.TensorSpec("hidden_states", "float32", ["batch", "sequence", c.hidden_size])]
    outs += [M.TensorSpec(n, "float32", present) for n in expand_names(LLM_OUTPUTS, c.num_hidden_layers)[2:]]
    return ins, outs


def text_contract(model: Setokim) -> dict:
    """What the runtime needs to build the same sequences as Setokim, without transformers."""
    return {
        "special_ids": dict(model.ids),
        "prompts": {"caption": CAPTION_PROMPT, "question": QUESTION_PROMPT, "refer": REFER_PROMPT, "draw": DRAW_PROMPT},
        "num_layers": model.llm.config.num_hidden_layers,
        "max_positions": model.llm.config.max_position_embeddings,
    }


def export_bundle(ckpt: Path, out: Path, opset: int = DEFAULT_OPSET, validate: bool = True, max_tokens: int | None = None) -> Path:
    """Export every registered stage of a checkpoint to `out` (atomically) and validate each."""
    from tqdm.auto import tqdm

    from setok.export.validate import validate_stage

    model = Setokim.from_pretrained(ckpt)
    if max_tokens is not None:
        model.cfg.cluster.max_tokens = max_tokens  # the merger's T follows; weights do not depend on it
        model.vision.merger.max_tokens = max_tokens
    ex = examples(model)
    entries = []
    with atomic_dir(out) as tmp:
        stages = [s for s in STAGES.values() if s.applies(model.cfg)]
        for st in tqdm(stages, desc="export", unit="stage", dynamic_ncols=True):
            path = export_stage(st, model, tmp, opset, ex.get(st.name, ex.get("cluster")))
            if validate:
                validate_stage(st, model, path, ex.get(st.name, ex.get("cluster")))
            entries.append(_entry(st, model, tmp, path, opset))
        files = {role: {"file": f, "sha256": M.sha256(tmp / f)} for role, f in
                 (("embeddings", "llm_embeddings.npy"), ("tokenizer", "tokenizer.json"))}
        M.Manifest(setok.__version__, model.cfg.to_dict(), preprocessing(model), entries, files, text_contract(model)).write(tmp)
    log.info("bundle written to %s", out)
    return Path(out)


def _entry(st: Stage, model: Setokim, root: Path, path: Path, opset: int) -> M.StageEntry:
    if st.name == "llm":
        ins, outs = llm_specs(model)
    else:
        ins, outs = st.specs(model.cfg, "inputs"), st.specs(model.cfg, "outputs")
    extra = {"plugin_namespace": "setok", "op": "setok::DensityPeakCluster"} if st.name == "cluster_plugin" else {}
    return M.StageEntry(st.name, path.name, M.sha256(path), "fp32", opset, ins, outs, extra)


def preprocessing(model: Setokim) -> dict:
    size = model.cfg.encoder.image_size
    return {"size": size, "mean": list(MEAN), "std": list(STD), "layout": "NCHW", "channels": "RGB",
            "resize": "shorter side to size (bicubic), then center crop; EXIF orientation applied; any mode converted to RGB"}

