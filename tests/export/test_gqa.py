"""`--llm-attention gqa`: the llm graph's attention as ONNX Runtime's GroupQueryAttention, checked with
real exports and real ONNX Runtime sessions against PyTorch, and ragged batches through the runtime's
own decoders."""

import collections
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from setok import manifest as M
from setok.backends.decode import HostDecoder
from setok.backends.onnxrt.session import OrtBackend
from setok.errors import InputError
from setok.export.attention import GQA_OP, check_supported, rewrite_gqa, rope_tables
from setok.export.llm import export_llm, llm_record, llm_specs, validate_llm

HEADS, KV_HEADS = 4, 2  # repeat_kv in the eager graph: each key/value head serves two query heads


def small_llm(family: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    kw = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 128}
    if family == "qwen2":  # bias on q/k/v
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def both_forms(request, tmp_path_factory):
    torch.set_num_threads(1)
    llm = small_llm(request.param)
    eager = export_llm(llm, tmp_path_factory.mktemp(f"{request.param}_eager"))
    gqa = export_llm(llm, tmp_path_factory.mktemp(f"{request.param}_gqa"))
    stats = rewrite_gqa(gqa, HEADS, KV_HEADS, rope_tables(llm))
    return llm, eager, gqa, stats


def ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def io_names(path: Path) -> list:
    g = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]


def test_every_layer_becomes_one_gqa_node_and_matches_pytorch(both_forms):
    llm, eager, gqa, stats = both_forms
    before, after = ops(eager), ops(gqa)
    assert after[GQA_OP] == stats["layers"] == 2
    assert after["RotaryEmbedding"] == stats["rotary"] == 4 and after["Neg"] == 0  # q and k of each layer
    assert before["Softmax"] == 2 and after["Softmax"] == 0 and after["Expand"] < before["Expand"]
    assert stats["nodes_after"] < stats["nodes_before"]
    assert io_names(gqa) == io_names(eager), "the graph's inputs and outputs are the runtime's contract"
    result = validate_llm(llm, gqa)  # right-padded prefill + decode (the runtime's batching)
    for step in ("prefill", "decode"):
        assert result[f"{step}_logits_max_abs"] < 1e-4 and result[f"{step}_logits_cos"] > 0.9999


def greedy(decoder, table, embeds, mask=None, steps=6):
    logits, _ = decoder.step(embeds, mask)
    got = []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        got.append(nxt.tolist())
        logits, _ = decoder.step(table[nxt][:, None])
    return np.array(got).T.tolist()


def entry_of(llm, path: Path, **extra) -> M.StageEntry:
    ins, outs = llm_specs(types.SimpleNamespace(llm=llm))
    return M.StageEntry("llm", path.name, "", "fp32", 17, ins, outs, {**llm_record(types.SimpleNamespace(llm=llm)), **extra})


def test_a_ragged_batch_decodes_like_each_prompt_alone(both_forms):
    """Prompts of 3, 7 and 5 tokens, one prefill (right-padded), 60 greedy steps: each row's tokens equal
    its own unbatched run's, on the eager graph and the GQA graph (its ORT decoder with shared past /
    present buffers, grown once past 64 positions), through the runtime's decoders."""
    llm, eager, gqa, _ = both_forms
    table = llm.get_input_embeddings().weight.detach().numpy()
    rng = np.random.default_rng(3)
    prompts = [table[rng.integers(0, 96, n)] for n in (3, 7, 5)]

    def run(decoder, embeds, mask=None):
        return greedy(decoder, table, embeds, mask, steps=60)

    for path, extra in ((eager, {}), (gqa, {}), (gqa, {"attention": "gqa"})):
        entry = entry_of(llm, path, **extra)
        backend = OrtBackend(path, entry)
        alone = [run(backend.decoder(1), p[None])[0] for p in prompts]
        length = max(len(p) for p in prompts)
        embeds, mask = np.zeros((3, length, 64), np.float32), np.zeros((3, length), np.int64)
        for i, p in enumerate(prompts):
            embeds[i, :len(p)], mask[i, :len(p)] = p, 1
        assert run(backend.decoder(3), embeds, mask) == alone, path
        assert run(HostDecoder(backend, entry), embeds, mask) == alone, path
        assert len({tuple(a) for a in alone}) == 3, "the prompts must decode differently for this to test anything"
        if extra:
            decoder = backend.decoder(3)
            run(decoder, embeds, mask)
            assert decoder.buffers is not None and decoder.capacity == 128, "shared buffers, grown from 64"


def test_shared_buffers_snapshot_is_a_copy(both_forms):
    """A snapshot taken mid-decode (shared buffers) seeds a second decoder; the first decoder's later
    in-place writes do not reach it, so both continue alike."""
    llm, _, gqa, _ = both_forms
    table = llm.get_input_embeddings().weight.detach().numpy()
    backend = OrtBackend(gqa, entry_of(llm, gqa, attention="gqa"))
    prompt = table[np.random.default_rng(5).integers(0, 96, 6)][None]
    first = backend.decoder(1)
    greedy(first, table, prompt, steps=4)
    state = first.snapshot()
    nxt = np.array([7])
    after = greedy(first, table, table[nxt][:, None], steps=8)
    second = backend.decoder(1)
    second.restore(state)
    assert greedy(second, table, table[nxt][:, None], steps=8) == after


def test_unsupported_attention_is_refused_by_name():
    from transformers import Gemma2Config, Qwen2Config

    with pytest.raises(InputError, match="sliding window"):
        check_supported(Qwen2Config(use_sliding_window=True, sliding_window=128))
    check_supported(Qwen2Config(use_sliding_window=False, sliding_window=128))  # Qwen2's default: off
    with pytest.raises(InputError, match="soft-caps"):
        check_supported(Gemma2Config())


def test_a_graph_without_the_kv_cache_concat_is_refused(tmp_path):
    """A present that is not Concat(past, new) is not optimum's graph: a clear error, the file untouched."""
    h = onnx.helper
    x = h.make_tensor_value_info("past_key_values.0.key", onnx.TensorProto.FLOAT, [1, 2, 0, 8])
    v = h.make_tensor_value_info("past_key_values.0.value", onnx.TensorProto.FLOAT, [1, 2, 0, 8])
    outs = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 2, 0, 8]) for n in ("present.0.key", "present.0.value")]
    g = h.make_graph([h.make_node("Identity", [x.name], ["present.0.key"]), h.make_node("Identity", [v.name], ["present.0.value"])],
                     "g", [x, v], outs)
    path = tmp_path / "llm.onnx"
    onnx.save(h.make_model(g), str(path))
    before = path.read_bytes()
    with pytest.raises(InputError, match="present.0.key is not Concat"):
        rewrite_gqa(path, 2, 2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["llm.onnx"]


def test_cli_export_gqa_runs_batched_and_is_refused_by_tensorrt(tiny_ckpt, tmp_path):
    """`setok export --llm-attention gqa`: the manifest records the form, the runtime's batched answers
    equal its one-at-a-time answers, `setok parity` passes, ORT CPU lint passes, TensorRT's lint and
    build refuse it by name."""
    import json
    import subprocess
    import sys

    from setok.data.items import eval_items
    from setok.runtime import Pipeline

    def setok(*args):
        return subprocess.run([sys.executable, "-m", "setok.cli", *map(str, args)], check=False, capture_output=True, text=True)

    bundle = tmp_path / "gqa"
    assert setok("export", tiny_ckpt, "--out", bundle, "--llm-attention", "gqa").returncode == 0
    assert M.load_manifest(bundle).stage("llm").extra["attention"] == "gqa"
    assert ops(bundle / "llm.onnx")[GQA_OP] > 0
    pipe = Pipeline.open(bundle)
    items = eval_items(3, seed=46)
    questions = ["what is here", "how many objects are there", "what colour is the big one on the left"]
    batched = pipe.answer_batch([it.image for it in items], questions, max_new_tokens=6)
    assert [b.token_ids for b in batched] == [pipe.answer(it.image, q, max_new_tokens=6).token_ids
                                             for it, q in zip(items, questions)]
    parity = setok("parity", tiny_ckpt, bundle, "--n", "2")  # every stage and end to end against PyTorch
    assert parity.returncode == 0 and "PASS" in parity.stdout, parity.stdout[-2000:]
    assert setok("lint", bundle, "--target", "onnxruntime-cpu").returncode == 0
    lint = setok("lint", bundle, "--json")
    assert lint.returncode == 1 and any("GroupQueryAttention" in f["message"] for f in json.loads(lint.stdout)), lint.stdout
    build = setok("build", bundle, "--out", tmp_path / "engines")
    assert build.returncode == 2 and "--llm-attention eager" in build.stderr and not (tmp_path / "engines").exists()
