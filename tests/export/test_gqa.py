"""`--llm-attention gqa`: the llm graph's attention as ONNX Runtime's GroupQueryAttention, and
`--llm-logits newest` on either form, checked with real exports and real ONNX Runtime sessions against
PyTorch, and ragged batches through the runtime's own decoders."""

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
from setok.export.logits import rewrite_newest

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


@pytest.fixture(scope="module")
def eager_newest(both_forms, tmp_path_factory):
    """The eager graph with newest-token logits (`--llm-logits newest`, the form TensorRT builds)."""
    import shutil

    _, eager, _, _ = both_forms
    out = tmp_path_factory.mktemp("eager_newest") / eager.name
    shutil.copy(eager, out)
    rewrite_newest(out)
    return out


def ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def io_names(path: Path) -> list:
    g = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in (*g.input, *g.output)]


def test_every_layer_becomes_one_gqa_node_and_matches_pytorch(both_forms):
    llm, eager, gqa, stats = both_forms
    before, after = ops(eager), ops(gqa)
    assert after[GQA_OP] == stats["layers"] == 2
    # HF's rotary ops on q and k became GroupQueryAttention's own (packed q/k/v, do_rotary=1)
    assert stats["packed_qkv"] == 2 and after["RotaryEmbedding"] == 0 and after["Neg"] == 0
    assert all(a.i == 1 for n in onnx.load(str(gqa)).graph.node if n.op_type == GQA_OP
               for a in n.attribute if a.name == "do_rotary")
    assert before["Softmax"] == 2 and after["Softmax"] == 0 and after["Expand"] < before["Expand"]
    assert stats["nodes_after"] < stats["nodes_before"]
    assert io_names(gqa) == io_names(eager), "the graph's inputs and outputs are the runtime's contract"
    result = validate_llm(llm, gqa)  # right-padded prefill + decode (the runtime's batching)
    for step in ("prefill", "decode"):
        assert result[f"{step}_logits_max_abs"] < 1e-4 and result[f"{step}_logits_cos"] > 0.9999


def weight_matmuls(path: Path) -> int:
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in inits for n in g.node)


def test_sibling_projections_are_packed(both_forms):
    """q/k/v and gate/up read the same hidden state: one MatMul each (genai's layout; the packed q/k/v
    goes to GroupQueryAttention whole), so per layer 4 weight MatMuls instead of 7, and no Transpose
    left around the attention."""
    _, eager, gqa, stats = both_forms
    assert weight_matmuls(eager) == 7 * 2 + 1 and weight_matmuls(gqa) == 4 * 2 + 1  # + the LM head
    assert stats["packed"] == 2 * 2 and ops(gqa)["Split"] == 2  # q/k/v go to GQA packed; gate/up split
    assert ops(gqa)["Transpose"] == 0


def test_logits_come_for_the_newest_token_only(both_forms, eager_newest):
    """A right-padded prefill: the GQA graph's and the newest-logits eager graph's logits are (B, 1, V),
    each row's newest real token, equal to the full eager graph's at that column; hidden_states keep
    every position (the seg head reads them). Then a decode step on the eager cache, whose short row
    has padding holes before the new token: still that token's logits."""
    import onnxruntime as ort

    _, eager, gqa, stats = both_forms
    assert stats["newest_logits"] == 1
    rng = np.random.default_rng(0)
    feed = {M.INPUTS_EMBEDS: rng.standard_normal((2, 6, 64)).astype(np.float32),
            M.ATTENTION_MASK: np.array([[1] * 6, [1] * 4 + [0] * 2]), M.POSITION_IDS: np.array([range(6), [0, 1, 2, 3, 3, 3]])}
    outs, sessions = {}, {}
    for name, path in (("eager", eager), ("gqa", gqa), ("eager_newest", eager_newest)):
        sess = sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        past = {i.name: np.zeros((2, KV_HEADS, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
        outs[name] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feed, **past})))
    full = outs["eager"][M.LOGITS]
    assert full.shape == (2, 6, 96)
    for name in ("gqa", "eager_newest"):
        assert outs[name][M.LOGITS].shape == (2, 1, 96), name
        np.testing.assert_allclose(outs[name][M.LOGITS][:, 0], full[[0, 1], [5, 3]], atol=1e-4)
        assert outs[name][M.HIDDEN_STATES].shape == (2, 6, 64)
    step = {M.INPUTS_EMBEDS: rng.standard_normal((2, 1, 64)).astype(np.float32),
            M.ATTENTION_MASK: np.array([[1] * 7, [1] * 4 + [0] * 2 + [1]]), M.POSITION_IDS: np.array([[6], [4]])}
    got = {}
    for name in ("eager", "eager_newest"):
        kv = M.KvCache.for_layers(2)
        past = {p: outs[name][q] for p, q in zip(kv.past, kv.present)}
        got[name] = sessions[name].run([M.LOGITS], {**step, **past})[0]
    np.testing.assert_allclose(got["eager_newest"], got["eager"], atol=1e-5)


def test_newest_logits_need_the_lm_head_as_one_matmul(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Tanh", ["h"], [M.LOGITS])], "softcap",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 2, 4])],
                          [helper.make_tensor_value_info(M.LOGITS, TensorProto.FLOAT, [1, 2, 4])])
    path = tmp_path / "llm.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(InputError, match="logits come from Tanh; expected the LM head as one MatMul"):
        rewrite_newest(path)
    assert [p.name for p in tmp_path.iterdir()] == ["llm.onnx"]  # nothing half-written beside it


def test_packing_rewrites_external_data_without_dead_bytes(tmp_path):
    """An LLM whose weights live in external data (every real-size one): the packed weights join a fresh
    data file that holds only what the graph reads, and the graph still matches PyTorch."""
    from setok.export.pack import read_initializer

    llm = small_llm("qwen2")
    path = export_llm(llm, tmp_path)
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    rewrite_gqa(path, HEADS, KV_HEADS, rope_tables(llm))
    g = onnx.load(str(path), load_external_data=False).graph
    external = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    held = sum(read_initializer(t, tmp_path).nbytes for t in external)
    data = (tmp_path / (path.name + ".data")).stat().st_size
    assert any(".weight" in t.name and "packed3" in t.name for t in external)
    assert held <= data < held + 4096 * (len(external) + 1), "only the graph's tensors (page-aligned)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.onnx", "llm.onnx.data"]
    result = validate_llm(llm, path)
    assert result["decode_logits_max_abs"] < 1e-4


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


def test_a_ragged_batch_decodes_like_each_prompt_alone(both_forms, eager_newest):
    """Prompts of 3, 7 and 5 tokens, one prefill (right-padded), 60 greedy steps: each row's tokens equal
    its own unbatched run's, on the eager graph and the GQA graph (its ORT decoder with shared past /
    present buffers, grown once past 64 positions), through the runtime's decoders."""
    llm, eager, gqa, _ = both_forms
    table = llm.get_input_embeddings().weight.detach().numpy()
    rng = np.random.default_rng(3)
    prompts = [table[rng.integers(0, 96, n)] for n in (3, 7, 5)]

    def run(decoder, embeds, mask=None):
        return greedy(decoder, table, embeds, mask, steps=60)

    for path, extra in ((eager, {}), (eager_newest, {"logits": "newest"}), (gqa, {}), (gqa, {"attention": "gqa"})):
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
        if extra.get("attention"):
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


def assert_batched_answers_are_serial(bundle: Path, seed: int) -> None:
    """The runtime's batched answers (one right-padded prefill) equal its one-at-a-time answers."""
    from setok.data.items import eval_items
    from setok.runtime import Pipeline

    pipe = Pipeline.open(bundle)
    items = eval_items(3, seed=seed)
    questions = ["what is here", "how many objects are there", "what colour is the big one on the left"]
    batched = pipe.answer_batch([it.image for it in items], questions, max_new_tokens=6)
    assert [b.token_ids for b in batched] == [pipe.answer(it.image, q, max_new_tokens=6).token_ids
                                             for it, q in zip(items, questions)]


def test_cli_export_gqa_runs_batched_and_is_refused_by_tensorrt(tiny_ckpt, tmp_path):
    """`setok export --llm-attention gqa`: the manifest records the form, the runtime's batched answers
    equal its one-at-a-time answers, `setok parity` passes, ORT CPU lint passes, TensorRT's lint and
    build refuse it by name; int4 weights on it pass the weight gate and `setok parity --precision int4`."""
    import json
    import subprocess
    import sys

    def setok(*args):
        return subprocess.run([sys.executable, "-m", "setok.cli", *map(str, args)], check=False, capture_output=True, text=True)

    bundle = tmp_path / "gqa"
    assert setok("export", tiny_ckpt, "--out", bundle, "--llm-attention", "gqa").returncode == 0
    assert M.load_manifest(bundle).stage("llm").extra["attention"] == "gqa"
    assert ops(bundle / "llm.onnx")[GQA_OP] > 0
    assert_batched_answers_are_serial(bundle, seed=46)
    parity = setok("parity", tiny_ckpt, bundle, "--n", "2")  # every stage and end to end against PyTorch
    assert parity.returncode == 0 and "PASS" in parity.stdout, parity.stdout[-2000:]
    assert setok("lint", bundle, "--target", "onnxruntime-cpu").returncode == 0
    lint = setok("lint", bundle, "--json")
    assert lint.returncode == 1 and any("GroupQueryAttention" in f["message"] for f in json.loads(lint.stdout)), lint.stdout
    build = setok("build", bundle, "--out", tmp_path / "engines")
    assert build.returncode == 2 and "--llm-attention eager" in build.stderr and not (tmp_path / "engines").exists()
    # int4 weights on the GQA form (its logits are the newest token's: the gate and parity step through)
    q = tmp_path / "gqa_int4"
    calib = setok("calibrate", bundle, "--out", q, "--stages", "llm", "--llm-weights", "int4", "--n", "8", "--task-gate", "0",
                  "--keep-slow-int8")  # a tiny LLM's int4 is not faster than its fp32: the accuracy gate still runs
    assert calib.returncode == 0, calib.stderr[-2000:]
    entry = M.load_manifest(q).stage("llm")
    assert entry.precision == "int4" and entry.extra["attention"] == "gqa" and ops(q / entry.file)["MatMulNBits"] > 0
    parity = setok("parity", tiny_ckpt, q, "--n", "2", "--precision", "int4")
    assert parity.returncode == 0 and "PASS" in parity.stdout, parity.stdout[-2000:]


def test_packing_without_the_disk_space_is_refused_up_front(tmp_path, monkeypatch):
    """The fresh data file is written beside the old one; with too little free space the rewrite stops
    with a one-line error naming both sizes, and the graph and its data are left as they were."""
    import shutil

    llm = small_llm("llama")
    path = export_llm(llm, tmp_path)
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))  # the OS's answer, not ours
    with pytest.raises(InputError, match="GB free, but packing"):
        rewrite_gqa(path, HEADS, KV_HEADS, rope_tables(llm))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_export_newest_logits_on_the_eager_form(tiny_ckpt, tiny_newest_bundle):
    """`setok export --llm-logits newest` (eager attention: the form TensorRT builds): the manifest records
    it with logits [batch, 1, vocab], `setok parity` passes, TensorRT's lint finds nothing to refuse,
    and the batched runtime answers equal the one-at-a-time ones."""
    import subprocess
    import sys

    bundle = tiny_newest_bundle
    entry = M.load_manifest(bundle).stage("llm")
    assert entry.extra["logits"] == "newest" and "attention" not in entry.extra
    assert next(o for o in entry.outputs if o.name == M.LOGITS).shape[:2] == ["batch", 1]
    assert ops(bundle / "llm.onnx")["GatherND"] == 1 and GQA_OP not in ops(bundle / "llm.onnx")
    for args in (["parity", str(tiny_ckpt), str(bundle), "--n", "2"], ["lint", str(bundle), "--target", "tensorrt"]):
        proc = subprocess.run([sys.executable, "-m", "setok.cli", *args], check=False, capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    assert_batched_answers_are_serial(bundle, seed=47)
