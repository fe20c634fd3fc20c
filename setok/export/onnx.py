"""`setok export`: one ONNX file per stage plus manifest.json, written atomically.

A stage's exporter writes one file (`export_module` here for every torch-traced stage; the llm
and the plugin form have their own), its validator (validate.py) checks it; export_bundle
iterates the registry and composes them and the manifest. Each can be called alone.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import onnx
import torch

import setok
from setok import manifest as M
from setok.errors import InputError
from setok.export.attention import EAGER, GQA
from setok.export.external import release_freed_memory
from setok.export.half import HALF, to_fp16
from setok.export.stages import STAGES, Stage, flow
from setok.io import atomic_dir
from setok.model.setokim import (
    CAPTION_PROMPT,
    DRAW_PROMPT,
    QUESTION_PROMPT,
    REFER_PROMPT,
    Setokim,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def _dynamic_axes(specs: list[M.TensorSpec]) -> dict[str, dict[int, str]]:
    axes = {}
    for spec in specs:
        sym = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        if sym:
            axes[spec.name] = sym
    return axes


def export_module(stage: Stage, model: Setokim, out_dir: Path, opset: int, example: dict) -> Path:
    """The default exporter: trace `stage.module(model)` on `example` into `out_dir/<stage>.onnx`."""
    path = Path(out_dir) / stage.file
    ins, outs = stage.specs(model)
    module = stage.module(model).eval()
    args = tuple(example[s.name] for s in ins)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=[s.name for s in ins], output_names=[s.name for s in outs],
                          dynamic_axes=_dynamic_axes(ins + outs), opset_version=opset, dynamo=False)
    _declare_shapes(path, ins + outs)
    return path


def _declare_shapes(path: Path, specs: list[M.TensorSpec]) -> None:
    """Write the registry's fixed dims into the graph's I/O (the tracer names some after ops)."""
    m = onnx.load(str(path))
    by_name = {s.name: s for s in specs}
    for value in list(m.graph.input) + list(m.graph.output):
        spec = by_name.get(value.name)
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


def text_contract(model: Setokim, max_context: int | None = None) -> dict:
    """What the runtime needs to build the same sequences as Setokim, without transformers."""
    return {
        "special_ids": dict(model.ids),
        "prompts": {"caption": CAPTION_PROMPT, "question": QUESTION_PROMPT, "refer": REFER_PROMPT, "draw": DRAW_PROMPT},
        "num_layers": model.llm.config.num_hidden_layers,
        # The LLM's own context, capped at export (the runtime and TensorRT size KV caches from it).
        "max_positions": min(model.llm.config.max_position_embeddings, max_context or 1 << 62),
        **({"chat_template": model.tok.chat_template} if getattr(model.tok, "chat_template", None) else {}),
    }


def export_bundle(ckpt: Path, out: Path, opset: int = DEFAULT_OPSET, validate: bool = True, max_tokens: int | None = None,
                  stages: dict[str, Stage] | None = None, max_context: int | None = None, dtype: str = "fp32",
                  attention: str = EAGER, logits: str | None = None) -> Path:
    """Export every registered stage (of `stages`, default the registry) of a checkpoint to `out`
    (atomically), validate each, and write the manifest. dtype "fp16": the stages that may take
    it get float16 weights (float32 I/O), validated against PyTorch fp32 with their fp16 gates.
    attention "gqa": the stages with attention get ONNX Runtime's GroupQueryAttention (validated
    again; ONNX Runtime only, TensorRT cannot parse it). logits "newest": the LM head reads only each
    row's newest token ((B, 1, V) logits; None: newest for gqa, all for eager)."""
    from tqdm.auto import tqdm

    if attention not in M.ATTENTION_FORMS:
        raise InputError(f"attention {attention!r}: expected one of {list(M.ATTENTION_FORMS)}")
    logits = logits or (M.NEWEST_LOGITS if attention == GQA else M.ALL_LOGITS)
    if logits not in M.LOGITS_FORMS:
        raise InputError(f"logits {logits!r}: expected one of {list(M.LOGITS_FORMS)}")
    model = Setokim.from_pretrained(ckpt)
    if max_tokens is not None:
        model.cfg.cluster.max_tokens = max_tokens  # the merger's T follows; weights do not depend on it
        model.vision.merger.max_tokens = max_tokens
    ex = flow(model)
    chosen = [s for s in (STAGES if stages is None else stages).values() if s.applies(model.cfg)]
    entries, files = [], {}
    with atomic_dir(out) as tmp:
        for st in tqdm(chosen, desc="export", unit="stage", dynamic_ncols=True):
            example = st.example(ex)
            path = st.export(st, model, tmp, opset, example)
            if validate:
                st.validate(st, model, path, example)
            record = _rewrite(st, model, path, attention, logits)  # what the manifest records of the new form
            if record and validate:
                st.validate(st, model, path, example)
            precision = "fp32"
            if dtype == HALF and st.half:
                precision = HALF
                to_fp16(path)
                if validate:
                    st.validate(dataclasses.replace(st, tolerance=st.half_tolerance), model, path, example)
            entries.append(_entry(st, model, path, opset, precision, record))
            files.update({role: {"file": f, "sha256": M.sha256(tmp / f)} for role, f in st.files})
            release_freed_memory()  # a stage's protos and sessions, before the next (larger) one
        text = text_contract(model, max_context)
        M.Manifest(setok.__version__, model.cfg.to_dict(), preprocessing(model), entries, files, text).write(tmp)
    log.info("bundle written to %s", out)
    return Path(out)


def _rewrite(st: Stage, model: Setokim, path: Path, attention: str, logits: str) -> dict:
    """The stage's graph in the requested attention / logits form (in place); its manifest extras."""
    newest = logits == M.NEWEST_LOGITS
    if attention == GQA and st.fuse_attention is not None:
        return st.fuse_attention(st, model, path, newest=newest)
    if newest and st.newest_logits is not None:
        return st.newest_logits(st, model, path)
    return {}


def _entry(st: Stage, model: Setokim, path: Path, opset: int, precision: str = "fp32",
           record: dict | None = None) -> M.StageEntry:
    ins, outs = st.specs(model)
    extra = {**st.extra(model), **(record or {})}
    if extra.get("logits") == M.NEWEST_LOGITS:  # one position per row
        outs = [dataclasses.replace(o, shape=[o.shape[0], 1, *o.shape[2:]]) if o.name == M.LOGITS else o for o in outs]
    return M.StageEntry(st.name, path.name, M.sha256(path), precision, opset, ins, outs, extra, st.form_of,
                        M.data_records(path))


def preprocessing(model: Setokim) -> dict:
    enc = model.cfg.encoder
    return {"size": enc.image_size, "mean": list(enc.mean), "std": list(enc.std), "layout": "NCHW", "channels": "RGB",
            "resize": "shorter side to size (bicubic), then center crop; EXIF orientation applied; any mode converted to RGB"}

