"""LLM stage export: real optimum export, real onnxruntime sessions, compared with PyTorch."""

import numpy as np
import onnx
import pytest
import torch

from setok.export.llm import (
    LLM_INPUTS,
    LLM_OUTPUTS,
    _session,
    empty_past,
    expand_names,
    export_llm,
    presents_as_past,
    validate_llm,
)

STEPS = 5


def tiny_llm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(conf).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    llm = tiny_llm()
    return llm, export_llm(llm, tmp_path_factory.mktemp("llm"))


def test_names_and_opset(exported):
    llm, path = exported
    model = onnx.load(str(path))
    assert tuple(i.name for i in model.graph.input) == expand_names(LLM_INPUTS, 2)
    assert tuple(o.name for o in model.graph.output) == expand_names(LLM_OUTPUTS, 2)
    assert expand_names(LLM_INPUTS, 2)[3:5] == ("past_key_values.0.key", "past_key_values.0.value")
    assert {op.version for op in model.opset_import if op.domain in ("", "ai.onnx")} == {17}
    # The caller's model keeps its own attention implementation; export switches only temporarily.
    assert llm.config._attn_implementation == tiny_llm().config._attn_implementation


def test_validate_prefill_and_decode(exported):
    llm, path = exported
    stats = validate_llm(llm, path)
    for step in ("prefill", "decode"):
        assert stats[f"{step}_logits_max_abs"] < 1e-4
        assert stats[f"{step}_hidden_states_max_abs"] < 1e-4
        assert stats[f"{step}_logits_cos"] > 0.9999


def test_validate_raises_on_mismatch(exported):
    _, path = exported
    other = tiny_llm()
    with torch.no_grad():
        other.lm_head.weight.add_(0.5)
    with pytest.raises(ValueError, match="logits"):
        validate_llm(other, path)


def _prefill_inputs():
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((2, 6, 32)).astype(np.float32)
    mask = np.ones((2, 6), np.int64)
    mask[1, :3] = 0  # left padding, as Setokim.greedy batches prompts
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    return embeds, mask, pos


@torch.no_grad()
def _torch_greedy(llm) -> np.ndarray:
    embeds, mask, pos = (torch.from_numpy(a) for a in _prefill_inputs())
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    pos, ids = pos[:, -1:], []
    for _ in range(STEPS):
        nxt = out.logits[:, -1].argmax(-1)
        ids.append(nxt.numpy())
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        out = llm(inputs_embeds=llm.get_input_embeddings()(nxt)[:, None], attention_mask=mask,
                  position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
    return np.stack(ids, 1)


def _ort_greedy(session, table: np.ndarray) -> np.ndarray:
    """What the torch-free runtime does: numpy embedding lookup, presents fed back as past."""
    embeds, mask, pos = _prefill_inputs()
    names = [o.name for o in session.get_outputs()]
    past, ids = empty_past(session, embeds.shape[0]), []
    for _ in range(STEPS):
        out = dict(zip(names, session.run(None, {"inputs_embeds": embeds, "attention_mask": mask,
                                                  "position_ids": pos, **past})))
        past = presents_as_past(out)
        nxt = out["logits"][:, -1].argmax(-1)
        ids.append(nxt)
        embeds = table[nxt][:, None]
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
    return np.stack(ids, 1)


def test_greedy_decode_matches_pytorch(exported):
    llm, path = exported
    table = llm.get_input_embeddings().weight.detach().numpy()
    expected = _torch_greedy(llm)
    got = _ort_greedy(_session(path), table)
    assert got.shape == (2, STEPS)
    np.testing.assert_array_equal(got, expected)


def _initializers(path):
    model = onnx.load(str(path))
    return model, {t.name: onnx.numpy_helper.to_array(t, base_dir=str(path.parent)) for t in model.graph.initializer}


def test_streamed_weights_make_the_same_graph(exported, tmp_path, monkeypatch):
    """Past EXTERNAL_DATA_BYTES the weights are streamed to llm.onnx.data (no in-memory proto): the
    graph is node for node the inline one, every weight byte-identical, at page-aligned offsets."""
    from setok.export import external
    from setok.export import llm as L

    llm, inline = exported
    monkeypatch.setattr(L, "EXTERNAL_DATA_BYTES", 0)
    streamed = export_llm(llm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.onnx", "llm.onnx.data"]
    a, wa = _initializers(inline)
    b, wb = _initializers(streamed)
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name, value in wa.items():
        assert wb[name].dtype == value.dtype and np.array_equal(wb[name], value), name
    refs = onnx.load(str(streamed), load_external_data=False).graph.initializer
    offsets = [int(e.value) for t in refs for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(wb) and all(o % external.ALIGN == 0 for o in offsets)
    onnx.checker.check_model(str(streamed))
    assert validate_llm(llm, streamed)["decode_logits_max_abs"] < 1e-4


def test_without_the_exporter_hook_it_still_externalises(exported, tmp_path, monkeypatch):
    """A PyTorch whose TorchScript exporter has no `_model_to_graph` to wrap: inline export, then the
    weights are moved out (the memory-hungry way, with a warning)."""
    from setok.export import external
    from setok.export import llm as L

    def missing():
        raise LookupError("no _model_to_graph")

    llm, _ = exported
    monkeypatch.setattr(L, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(external, "_exporter_module", missing)
    path = export_llm(llm, tmp_path)
    assert (tmp_path / "llm.onnx.data").stat().st_size > path.stat().st_size
    assert validate_llm(llm, path)["prefill_logits_max_abs"] < 1e-4
