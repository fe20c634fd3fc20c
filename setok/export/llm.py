"""Export the LLM stage (a Hugging Face decoder reading `inputs_embeds`) to one ONNX graph with KV cache.

How optimum is used: the family's own ONNX config (`LlamaOnnxConfig`, `Qwen2OnnxConfig`, ... chosen by
`model_type` from setok/model/families.py; task "text-generation-with-past", i.e. `text-generation` with
`use_past=True, use_past_in_inputs=True`) is subclassed so the graph takes `inputs_embeds` instead of
`input_ids` and returns the last hidden state next to `logits` and the presents. optimum's
`exporters.onnx.export` then does the work: dummy inputs from its generators, dynamic axes from the
config, its `ModelPatcher` (traceable causal masks, DynamicCache <-> tuple conversion, TorchScript
workarounds for transformers >= 4.53); `_trace` runs what its `exporters.onnx.export` runs, except that
weights past EXTERNAL_DATA_BYTES are streamed to external data (export/external.py) rather than built
into an in-memory proto, and `validate_llm` (prefill and decode) checks the file.

A thin wrapper module sits between optimum and the LLM for two reasons: the ONNX input order follows the
traced forward signature (LlamaForCausalLM puts `inputs_embeds` after `past_key_values`), and HF returns
*all* layers' hidden states, of which we want only the last one (after the final norm).

One graph serves prefill and decode: the runtime feeds an empty past `[B, kv_heads, 0, head_dim]` for
the prefill. That works in ONNX Runtime (Concat with a zero-length axis), so no dummy past of length 1
is needed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from setok import manifest as M
from setok.backends.decode import newest, take_newest
from setok.export.external import (
    attach_external,
    capture_params,
    linear_views,
    param_bytes,
    release_freed_memory,
)
from setok.model.families import set_attention

log = logging.getLogger(__name__)

ONNX_NAME = "llm.onnx"
# ONNX protobufs cap at 2 GB; past that the weights must live next to the graph.
EXTERNAL_DATA_BYTES = int(1.8e9)
LOGITS_ATOL = 1e-3
EXPORT_ATTENTION = "eager"


# Names in graph order (the manifest's, which are optimum's). The per-layer entries are templates
# ("{i}" = layer index) because the layer count belongs to the model; `expand_names(LLM_INPUTS,
# num_layers)` gives the exact list of a graph.
LLM_INPUTS = (M.INPUTS_EMBEDS, M.ATTENTION_MASK, M.POSITION_IDS, *M.PAST_NAMES)
LLM_OUTPUTS = (M.LOGITS, M.HIDDEN_STATES, *M.PRESENT_NAMES)


def expand_names(names: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    fixed = tuple(n for n in names if "{i}" not in n)
    per_layer = tuple(n for n in names if "{i}" in n)
    return fixed + tuple(n.format(i=i) for i in range(num_layers) for n in per_layer)


class EmbedsCausalLM(nn.Module):
    """Forward in the ONNX input order; returns logits, the normed last hidden state and the cache."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm
        self.config = llm.config  # optimum reads and overrides (use_cache, return_dict) the config

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values=None):
        out = self.llm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=True, output_hidden_states=True, return_dict=True,
        )
        # A dict in this order: optimum's patcher keeps it and torch.onnx names the flattened outputs
        # positionally (logits, hidden_states, then the presents).
        return OrderedDict(
            logits=out.logits, hidden_states=out.hidden_states[-1], past_key_values=out.past_key_values
        )


@functools.cache
def _onnx_config_class(model_type: str):
    """optimum's own ONNX config of the LLM's family (model/families.py), subclassed once for
    `inputs_embeds` in and the last hidden state out."""
    # Imported lazily: optimum is an export-time dependency, the runtime never needs it.
    from optimum.exporters.onnx import model_configs
    from optimum.utils import DummyInputGenerator

    from setok.model.families import llm_family

    base = getattr(model_configs, llm_family(model_type).onnx_config)

    class DummyEmbedsGenerator(DummyInputGenerator):
        SUPPORTED_INPUT_NAMES = ("inputs_embeds",)

        def __init__(self, task, normalized_config, batch_size=2, sequence_length=16, **kwargs):
            self.batch_size, self.sequence_length = batch_size, sequence_length
            self.hidden_size = normalized_config.hidden_size

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            shape = [self.batch_size, self.sequence_length, self.hidden_size]
            return self.random_float_tensor(shape, framework=framework, dtype=float_dtype)

    class EmbedsOnnxConfig(base):
        DUMMY_INPUT_GENERATOR_CLASSES = (DummyEmbedsGenerator,) + base.DUMMY_INPUT_GENERATOR_CLASSES
        # The base pads the mask to past+seq by reading input_ids; we do it from inputs_embeds below.
        PAD_ATTENTION_MASK_TO_PAST = False

        @property
        def inputs(self):
            common = OrderedDict(
                inputs_embeds={0: "batch_size", 1: "sequence_length"},
                attention_mask={0: "batch_size", 1: "past_sequence_length + sequence_length"},
                position_ids={0: "batch_size", 1: "sequence_length"},
            )
            self.add_past_key_values(common, direction="inputs")
            return common

        @property
        def outputs(self):
            common = OrderedDict(
                logits={0: "batch_size", 1: "sequence_length"},
                hidden_states={0: "batch_size", 1: "sequence_length"},
            )
            self.add_past_key_values(common, direction="outputs")
            return common

        def _create_dummy_input_generator_classes(self, **kwargs):
            # A past shorter than the new sequence, so no "past == seq" equality is baked into the trace.
            past = {**kwargs, "sequence_length": max(1, kwargs.get("sequence_length", 16) // 2 + 1)}
            pkv = self.DUMMY_PKV_GENERATOR_CLASS
            return [c(self.task, self._normalized_config, **(past if c is pkv else kwargs))
                    for c in self.DUMMY_INPUT_GENERATOR_CLASSES]

        def generate_dummy_inputs(self, framework="pt", **kwargs):
            dummy = super().generate_dummy_inputs(framework=framework, **kwargs)
            seq = dummy["inputs_embeds"].shape[1]
            past = dummy["past_key_values"][0][0].shape[-2]
            dummy["attention_mask"] = DummyInputGenerator.pad_input_on_dim(
                dummy["attention_mask"], desired_length=past + seq, dim=1
            )
            # Positions continue after the past, as at decode time.
            pos = np.arange(past, past + seq)[None].repeat(dummy["inputs_embeds"].shape[0], 0)
            dummy["position_ids"] = torch.from_numpy(pos) if framework == "pt" else pos
            return dummy

    EmbedsOnnxConfig.__name__ = EmbedsOnnxConfig.__qualname__ = f"{base.__name__}Embeds"
    return EmbedsOnnxConfig


def _onnx_config(llm):
    cls = _onnx_config_class(llm.config.model_type)
    return cls(llm.config, task="text-generation", use_past=True, use_past_in_inputs=True)


def export_llm(llm, out_dir: Path, opset: int = 17) -> Path:
    """Write out_dir/llm.onnx (fp32, dynamic batch / sequence / past) and return its path. Weights past
    EXTERNAL_DATA_BYTES go to llm.onnx.data, streamed (export/external.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_NAME
    config = _onnx_config(llm)
    wrapper = EmbedsCausalLM(llm).eval()
    # Eager attention: both eager and SDPA export cleanly at opset 17 here, but eager is the plainer
    # graph (MatMul/Softmax, no IsNaN/Where guards for fully masked rows) for the later INT8/TRT stages.
    before = set_attention(llm, EXPORT_ATTENTION)
    use_cache = getattr(llm.config, "use_cache", None)  # optimum overrides it on the shared config
    training = llm.training  # export needs eval mode; a caller mid-training gets its mode back
    try:
        with warnings.catch_warnings():
            # The tracer flags two Python branches it freezes: "cache is empty?" (traced with a
            # non-empty past, so the frozen branch is the Concat that also handles length 0) and
            # "mask shorter than kv?" (never: the runtime always feeds the full past+seq mask).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            _trace(wrapper, config, path, opset, external=param_bytes(llm) > EXTERNAL_DATA_BYTES)
    finally:
        set_attention(llm, before)
        llm.train(training)
        if use_cache is not None:
            llm.config.use_cache = use_cache
    log.info("exported %s (opset %d, %d layers)", path, opset, llm.config.num_hidden_layers)
    return path


@torch.no_grad()
def _trace(wrapper, config, path: Path, opset: int, external: bool) -> None:
    """What optimum's `exporters.onnx.export` does for PyTorch (its dummy inputs, `ModelPatcher`, input
    order and dynamic axes), with one change: large weights are streamed to external data instead of
    going through an in-memory proto. Validation is validate_llm's (prefill and decode), not optimum's."""
    from optimum.exporters.onnx.convert import check_dummy_inputs_are_allowed

    wrapper.config.return_dict = True
    for key, value in (config.values_override or {}).items():
        setattr(wrapper.config, key, value)
    dummy = config.rename_ambiguous_inputs(
        config.generate_dummy_inputs(framework="pt", batch_size=2, sequence_length=16))
    params: dict = {}
    capture = contextlib.nullcontext()
    if external:
        try:
            capture = capture_params(params)
        except LookupError as e:  # another PyTorch: export inline, then move the weights out
            log.warning("weights not streamed (%s); the export holds them in memory", e)
            external = False
    with config.patch_model_for_export(wrapper, model_kwargs={}), linear_views(wrapper), capture:
        check_dummy_inputs_are_allowed(wrapper, dummy)
        inputs = config.ordered_inputs(wrapper)
        torch.onnx.export(
            wrapper, (dummy,), f=str(path), input_names=list(inputs), output_names=list(config.outputs),
            dynamic_axes={**inputs, **config.outputs}, do_constant_folding=True, opset_version=opset,
            export_params=not external, dynamo=False,
        )
    if external:
        attach_external(path, params)
        params.clear()
        release_freed_memory()  # the trace's temporaries, before validation opens a session beside the weights
    elif path.stat().st_size > EXTERNAL_DATA_BYTES:
        _externalize(path)


def _externalize(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data")


# ---- validation ----------------------------------------------------------------------------------
def _session(onnx_path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # two short steps; don't fight the other stages for cores
    # Prepacking copies every MatMul weight into a kernel layout (+0.5 GB at the 0.5B shape) for a
    # speed validation does not need; without it ORT reads external data straight from its mapping.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Past of length 0, shaped from the graph's own static dims [B, kv_heads, 0, head_dim]."""
    past = set(M.KvCache.for_layers(len(session.get_inputs())).past)  # the input count bounds the layers
    feeds = {}
    for inp in session.get_inputs():
        if inp.name in past:
            _, heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
    return feeds


def _compare(stats: dict, step: str, ref: dict, got: dict, real: torch.Tensor) -> None:
    """Compare at real (unpadded) query positions only: a padded query sees no key at all, and eager
    (our graph: uniform softmax) and SDPA (PyTorch default) fill that don't-care row differently."""
    for name in (M.LOGITS, M.HIDDEN_STATES):
        a, b, keep = ref[name].detach().double().numpy(), got[name].astype(np.float64), real.numpy().astype(bool)
        if b.shape[1] == 1 < a.shape[1]:  # the graph emits each row's newest token only (GQA form's logits)
            a, keep = take_newest(a, newest(keep))[:, None], np.ones((len(a), 1), bool)
        a, b = a[keep].ravel(), b[keep].ravel()
        stats[f"{step}_{name}_max_abs"] = float(np.abs(a - b).max())
        stats[f"{step}_{name}_cos"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _torch_step(llm, embeds, mask, pos, past):
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=past,
              use_cache=True, output_hidden_states=True)
    return {M.LOGITS: out.logits, M.HIDDEN_STATES: out.hidden_states[-1]}, out.past_key_values


def _ort_step(session, embeds, mask, pos, past):
    feeds = {M.INPUTS_EMBEDS: embeds.numpy(), M.ATTENTION_MASK: mask.numpy(), M.POSITION_IDS: pos.numpy(), **past}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    return out, presents_as_past(out)


def _reads_lengths(onnx_path: Path) -> bool:
    """Does the graph's attention take the mask as per-row lengths (so padding must be on the right)?
    (Inline weights, < EXTERNAL_DATA_BYTES, are parsed here too; freed before validation opens its session.)"""
    import onnx

    from setok.export.attention import GQA_OP

    return any(n.op_type == GQA_OP for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next step's cache feeds: each present output under its past input's name."""
    kv = M.KvCache.for_layers(len(outputs))  # the output count bounds the layers
    return {p: outputs[q] for p, q in zip(kv.past, kv.present) if q in outputs}


@torch.no_grad()
def validate_llm(llm, onnx_path: Path, seed: int = 0, tolerance=None) -> dict[str, float]:
    """ORT vs PyTorch: prefill (seq 7, empty past; row 0 unpadded, row 1 right-padded as the runtime
    batches, row 2 left-padded as Setokim.greedy does, unless the graph's attention reads the mask as
    lengths: GroupQueryAttention) then one decode step fed with each side's own presents. Raises
    ValueError on a mismatch: logits max abs diff above `tolerance.max_abs` (default LOGITS_ATOL) or a
    cosine of logits or hidden state below `tolerance.cosine`."""
    atol = LOGITS_ATOL if tolerance is None else tolerance.max_abs
    min_cos = None if tolerance is None else tolerance.cosine
    gen = torch.Generator().manual_seed(seed)
    batch, seq, hidden = 2 if _reads_lengths(onnx_path) else 3, 7, llm.config.hidden_size
    embeds = torch.randn(batch, seq, hidden, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0
    if batch == 3:
        mask[2, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # positions count real tokens only, like Setokim.collate
    session = _session(onnx_path)
    stats: dict[str, float] = {}

    ref, cache = _torch_step(llm.eval(), embeds, mask, pos, None)
    got, past = _ort_step(session, embeds, mask, pos, empty_past(session, batch))
    _compare(stats, "prefill", ref, got, mask == 1)

    step = torch.randn(batch, 1, hidden, generator=gen)
    mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
    pos = pos[:, -1:] + 1
    ref, _ = _torch_step(llm, step, mask, pos, cache)
    got, _ = _ort_step(session, step, mask, pos, past)
    _compare(stats, "decode", ref, got, mask[:, -1:] == 1)

    log.info("LLM ONNX vs PyTorch: %s", {k: f"{v:.3g}" for k, v in stats.items()})
    for step_name in ("prefill", "decode"):
        diff = stats[f"{step_name}_{M.LOGITS}_max_abs"]
        if atol is not None and not diff <= atol:  # also catches NaN
            raise ValueError(f"{step_name} logits differ: max abs diff {diff:.3g} > {atol}")
        for name in (M.LOGITS, M.HIDDEN_STATES):
            cos = stats[f"{step_name}_{name}_cos"]
            if min_cos is not None and not cos >= min_cos:
                raise ValueError(f"{step_name} {name}: cosine {cos:.6f} < {min_cos} (max abs diff "
                                 f"{stats[f'{step_name}_{name}_max_abs']:.3g})")
    return stats


# ---- the llm entry of the stage registry ----------------------------------------------------------
def llm_specs(model) -> tuple[list[M.TensorSpec], list[M.TensorSpec]]:
    """The graph's I/O from the LLM's own config: GQA heads, head_dim, vocabulary, layers."""
    c = model.llm.config
    heads = c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    past = ["batch", heads, "past_sequence", hd]
    present = ["batch", heads, "total_sequence", hd]
    kv = M.KvCache.for_layers(c.num_hidden_layers)
    ins = [M.TensorSpec(M.INPUTS_EMBEDS, "float32", ["batch", "sequence", c.hidden_size]),
           M.TensorSpec(M.ATTENTION_MASK, "int64", ["batch", "total_sequence"]),
           M.TensorSpec(M.POSITION_IDS, "int64", ["batch", "sequence"])]
    ins += [M.TensorSpec(n, "float32", past) for n in kv.past]
    outs = [M.TensorSpec(M.LOGITS, "float32", ["batch", "sequence", c.vocab_size]),
            M.TensorSpec(M.HIDDEN_STATES, "float32", ["batch", "sequence", c.hidden_size])]
    outs += [M.TensorSpec(n, "float32", present) for n in kv.present]
    return ins, outs


def llm_record(model) -> dict:
    """The llm entry's `extra`: its KV-cache names (which present feeds which past)."""
    return {"kv_cache": M.KvCache.for_layers(model.llm.config.num_hidden_layers).to_dict()}


def fuse_llm_attention(stage, model, path: Path, newest: bool = True) -> dict[str, str]:
    """The llm graph's attention as GroupQueryAttention, in place (export/attention.py); returns what
    the manifest records of the new form. newest: logits for each row's newest token only."""
    from setok.export.attention import check_supported, rewrite_gqa, rope_tables

    c = model.llm.config
    check_supported(c)
    stats = rewrite_gqa(path, c.num_attention_heads, c.num_key_value_heads, rope_tables(model.llm), newest)
    return {"attention": M.GQA_ATTENTION, "logits": M.NEWEST_LOGITS if stats["newest_logits"] else M.ALL_LOGITS}


def newest_llm_logits(stage, model, path: Path) -> dict[str, str]:
    """The (eager) llm graph's LM head for each row's newest token only, in place (export/logits.py)."""
    from setok.export.logits import rewrite_newest

    rewrite_newest(path)
    return {"logits": M.NEWEST_LOGITS}


def export_llm_stage(stage, model, out_dir: Path, opset: int, example: dict) -> Path:
    """The LLM through optimum, plus what the runtime needs beside it: embeddings, tokenizer."""
    path = export_llm(model.llm, Path(out_dir), opset)
    files = dict(stage.files)
    emb = model.llm.get_input_embeddings().weight.detach().numpy().astype(np.float32)
    np.save(Path(out_dir) / files["embeddings"], emb)
    model.tok.backend_tokenizer.save(str(Path(out_dir) / files["tokenizer"]))
    return path
