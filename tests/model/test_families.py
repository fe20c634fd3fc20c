"""Hugging Face families: every supported vision tower and LLM, built from `transformers` config
classes with random weights (no hub), as a user would bring them with --encoder / --llm."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from setok import manifest as M
from setok.errors import InputError
from setok.export.llm import export_llm, llm_specs, validate_llm
from setok.model.families import (
    LLM_FAMILIES,
    VISION_FAMILIES,
    llm_family,
    vision_family,
)

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
LLM = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128}
# GQA everywhere (4 query heads, 2 KV heads); head_dim != hidden / heads where the family has one;
# sliding windows shorter than validate_llm's 7-token prefill; Gemma ties its embeddings.
LLM_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLM),
    "mistral": lambda: tf.MistralConfig(**LLM, sliding_window=4),
    "qwen2": lambda: tf.Qwen2Config(**LLM),
    "qwen3": lambda: tf.Qwen3Config(**LLM, head_dim=32),
    "phi3": lambda: tf.Phi3Config(**LLM, pad_token_id=0),
    "gemma": lambda: tf.GemmaConfig(**LLM, head_dim=32),
    "gemma2": lambda: tf.Gemma2Config(**LLM, head_dim=32, sliding_window=4),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**LLM, head_dim=32, sliding_window=4),
}
TOWERS = {
    "vit": lambda: tf.ViTModel(tf.ViTConfig(**VISION), add_pooling_layer=False),
    "siglip_vision_model": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)),
    "clip_vision_model": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)),
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**VISION)),
}


def test_every_family_has_a_test_config():
    assert set(LLM_CONFIGS) == set(LLM_FAMILIES) and set(TOWERS) == set(VISION_FAMILIES)


def test_an_unsupported_family_is_one_line_naming_the_supported():
    with pytest.raises(InputError, match=r"'gpt2' is not supported; supported: \[.*'qwen2'"):
        llm_family("gpt2")
    with pytest.raises(InputError, match="'resnet' is not supported"):
        vision_family("resnet")


class _Model:  # what llm_specs reads: the Setokim's `llm`
    def __init__(self, llm):
        self.llm = llm


@pytest.mark.parametrize("model_type", sorted(LLM_CONFIGS))
def test_llm_family_exports_through_its_own_optimum_config(model_type, tmp_path):
    import onnx

    torch.manual_seed(0)
    llm = tf.AutoModelForCausalLM.from_config(LLM_CONFIGS[model_type]()).eval()
    path = export_llm(llm, tmp_path)
    stats = validate_llm(llm, path)  # prefill with left padding, then a decode step on the cache
    assert stats["decode_logits_max_abs"] < 1e-4, stats
    graph = onnx.load(str(path), load_external_data=False).graph
    ins, outs = llm_specs(_Model(llm))
    assert [i.name for i in graph.input] == [s.name for s in ins]
    assert [o.name for o in graph.output] == [s.name for s in outs]
    past = next(s for s in ins if s.name == M.KvCache.for_layers(2).past[0])
    head_dim = getattr(llm.config, "head_dim", None) or 16
    assert past.shape[1] == 2 and past.shape[3] == head_dim  # GQA heads, the family's head_dim


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny 'pretrained' directories: a tower of each family; a Qwen2-shaped LLM with a locally
    trained byte-level tokenizer (EOS, no BOS, a chat template) and an embedding padded beyond it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from setok.data.scenes import text_corpus

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name, make in TOWERS.items():
        make().save_pretrained(root / name)
    (root / "clip_vision_model" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.45, 0.5], "image_std": [0.25, 0.26, 0.27]}))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(text_corpus(500, seed=3, size=64), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conf = tf.Qwen2Config(**{**LLM, "vocab_size": len(tok) + 13}, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    tf.Qwen2ForCausalLM(conf).save_pretrained(root / "qwen2")
    tok.save_pretrained(root / "qwen2")
    return root


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_vision_family_at_its_own_size(model_type, hf_dirs, tmp_path):
    from setok.config import preset
    from setok.export.stages import STAGES, flow
    from setok.model.setokim import Setokim
    from setok.model.text import train_text_tokenizer
    from setok.train.trainer import tower_config

    cfg = preset("tiny")
    cfg.encoder = tower_config(cfg.encoder, str(hf_dirs / model_type))
    assert (cfg.encoder.image_size, cfg.encoder.patch_size, cfg.encoder.num_patches) == (32, 8, 16)
    want = [0.4, 0.45, 0.5] if model_type == "clip_vision_model" else list(VISION_FAMILIES[model_type].norm[0])
    assert cfg.encoder.mean == want, "the directory's image processor, else the family's constants"
    model = Setokim(cfg, train_text_tokenizer(["a red circle"] * 4, 64), pretrained=True).eval()
    from safetensors.torch import load_file

    loaded = load_file(hf_dirs / model_type / "model.safetensors")  # the directory's weights, all of them
    tower = model.vision.encoder.backbone.model.state_dict()
    assert set(tower) == set(loaded) and all(torch.equal(v, loaded[k]) for k, v in tower.items())
    st = STAGES["encoder"]
    example = st.example(flow(model))
    assert example[M.PIXEL_VALUES].shape[-1] == 32
    st.validate(st, model, st.export(st, model, tmp_path, 17, example), example)
    # self-contained: the checkpoint rebuilds the tower from its stored config, the directory gone
    model.save_pretrained(tmp_path / "ck")
    again = Setokim.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        np.testing.assert_array_equal(model.vision.encoder(example[M.PIXEL_VALUES]).numpy(),
                                      again.vision.encoder(example[M.PIXEL_VALUES]).numpy())


def _cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "setok.cli", *map(str, args)], cwd=cwd, check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_user_tower_and_llm_end_to_end_with_the_llm_tokenizer(hf_dirs, tmp_path):
    """`setok train --encoder --llm --freeze-encoder`, then export and parity from another
    directory with the source directories gone: the checkpoint needs nothing else."""
    from safetensors.torch import load_file

    from setok.model.text import ADDED, load_pretrained_tokenizer
    from setok.runtime import Pipeline

    src = tmp_path / "src"
    shutil.copytree(hf_dirs / "siglip_vision_model", src / "tower")
    shutil.copytree(hf_dirs / "qwen2", src / "llm")
    _cli("train", "--preset", "tiny", "--out", tmp_path / "ck", "--steps", 4, "--encoder", src / "tower",
         "--llm", src / "llm", "--freeze-encoder", cwd=tmp_path)
    original = tf.AutoTokenizer.from_pretrained(src / "llm")
    tower_before = load_file(src / "tower" / "model.safetensors")
    shutil.rmtree(src)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["encoder"]["hf_config"]["model_type"] == "siglip_vision_model" and cfg["llm"]["hf_config"]["model_type"] == "qwen2"
    tok = load_pretrained_tokenizer(tmp_path / "ck")
    assert len(tok) == len(original) + len(ADDED)
    assert tok.encode("a red circle") == original.encode("a red circle"), "the LLM's own vocabulary"
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    frozen = {k.removeprefix("vision.encoder.backbone.model."): v for k, v in weights.items()
              if k.startswith("vision.encoder.backbone.model.")}
    assert frozen and all(torch.equal(frozen[k], v) for k, v in tower_before.items()), "--freeze-encoder"
    (tmp_path / "elsewhere").mkdir()
    _cli("export", tmp_path / "ck", "--out", tmp_path / "b", "--max-context", 96, cwd=tmp_path / "elsewhere")
    assert "PASS" in _cli("parity", tmp_path / "ck", tmp_path / "b", "--n", 2, cwd=tmp_path / "elsewhere")
    m = M.load_manifest(tmp_path / "b")
    assert m.text["special_ids"]["<bos>"] == original.eos_token_id, "no BOS: documents start with EOS"
    assert m.text["chat_template"] == original.chat_template and m.preprocessing["size"] == 32
    assert m.text["max_positions"] == 96, "the LLM's 128 positions, capped at export"
    pipe = Pipeline.open(tmp_path / "b")
    assert isinstance(pipe.answer(np.zeros((50, 40, 3), np.uint8), "how many objects are there").text, str)


def test_only_the_added_rows_are_initialised(hf_dirs):
    from setok.config import preset
    from setok.model.setokim import Setokim
    from setok.model.text import ADDED, load_pretrained_tokenizer

    cfg = preset("tiny")
    cfg.llm.hf_path = str(hf_dirs / "qwen2")
    model = Setokim(cfg, load_pretrained_tokenizer(hf_dirs / "qwen2"), pretrained=True)
    before = tf.AutoModelForCausalLM.from_pretrained(hf_dirs / "qwen2").get_input_embeddings().weight
    after = model.llm.get_input_embeddings().weight
    added = [model.ids[t] for t in ADDED]
    assert added == [300, 301, 302] and after.shape == before.shape  # inside the padded embedding: no resize
    keep = [i for i in range(before.shape[0]) if i not in added]
    assert torch.equal(after[keep], before[keep])
    torch.testing.assert_close(after[added], before[:300].mean(0).expand(3, -1))
    assert cfg.llm.hf_config["vocab_size"] == before.shape[0]
