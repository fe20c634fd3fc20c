"""Shapes, checkpoint round trip and the dynamic token count through the real modules."""

import json

import numpy as np
import pytest
import torch

from setok.config import SetokimConfig, preset
from setok.data.items import eval_items
from setok.errors import CheckpointError, InputError
from setok.model.encoder import preprocess
from setok.model.layers import patchify, unpatchify
from setok.model.setokim import Setokim
from setok.model.text import IM_START, TARGET, train_text_tokenizer
from setok.model.vision import VisionTokenizer


def images(n=3):
    return preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(n, seed=5)])))


@pytest.mark.parametrize("tokenizer", ["setok", "patch", "topk"])
def test_vision_shapes(tokenizer):
    cfg = preset("tiny", tokenizer)
    vt = VisionTokenizer(cfg)(images())
    n, t = cfg.encoder.num_patches, cfg.max_tokens
    assert vt.features.shape == (3, n, cfg.encoder.width)
    assert vt.tokens.shape == (3, t, cfg.merger.token_dim)
    assert vt.clusters.assignment.shape == (3, n)
    counts = vt.clusters.num_tokens
    if tokenizer == "patch":
        assert counts.tolist() == [n] * 3
    if tokenizer == "topk":
        assert counts.tolist() == [cfg.topk_tokens] * 3
    for b in range(3):  # rows past num_tokens are exactly zero (never read as tokens)
        assert torch.all(vt.tokens[b, counts[b]:] == 0)
    recon = VisionTokenizer(cfg).reconstruct(vt)
    assert recon.shape == (3, 3, 64, 64)


def test_patchify_round_trip():
    x = torch.randn(2, 3, 16, 16)
    assert patchify(x, 4).shape == (2, 16, 48)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)


def test_merger_inner_pass_is_per_cluster():
    """One masked pass equals running each cluster alone (the block-diagonal claim)."""
    cfg = preset("tiny")
    vt = VisionTokenizer(cfg).eval()
    feats = torch.randn(1, 12, cfg.encoder.width)
    assignment = torch.tensor([[0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 1, 2]])
    blk = vt.merger.inner[0]
    same = assignment.unsqueeze(2) == assignment.unsqueeze(1)
    joint = blk(feats, mask=same)
    for c in range(3):
        idx = (assignment[0] == c).nonzero().squeeze(1)
        alone = blk(feats[:, idx])
        torch.testing.assert_close(joint[:, idx], alone, atol=1e-5, rtol=1e-5)


def test_llm_sees_exactly_num_tokens(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    vt = model.vision(images(2))
    for b in range(2):
        k = int(vt.clusters.num_tokens[b])
        seq = model.image_prefix(vt.tokens[b, :k])
        assert seq.ids.count(-1) == k
        assert seq.ids[1] == model.ids[IM_START]


def test_checkpoint_round_trip(tiny_ckpt, tmp_path):
    model = Setokim.from_pretrained(tiny_ckpt)
    model.save_pretrained(tmp_path / "copy")
    again = Setokim.from_pretrained(tmp_path / "copy")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".copy.tmp-*")), "no temp directory left behind"
    assert not list((tmp_path / "copy").glob("*.bin")) and not list((tmp_path / "copy").glob("*.pt"))
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert SetokimConfig.from_dict(cfg).cluster.tau == model.cfg.cluster.tau


def test_corrupt_checkpoint_is_refused(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Setokim.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        Setokim.from_pretrained(bad)


def test_config_rejects_unknown_keys():
    data = preset("tiny").to_dict()
    data["cluster"]["tua"] = 0.3
    with pytest.raises(InputError, match="tua"):
        SetokimConfig.from_dict(data)


def test_text_tokenizer_round_trips_and_has_specials():
    tok = train_text_tokenizer(["a large red circle at top left, a small blue square"] * 3, 200)
    s = "a small blue square at top left, a large red circle"
    assert tok.decode(tok(s)["input_ids"]) == s
    assert "token_type_ids" not in tok(s)
    assert tok.convert_tokens_to_ids(TARGET) != tok.unk_token_id


def test_generation_count_is_chosen_by_the_llm(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    tokens, counts = model.generate_tokens(["a small red circle at center on a navy gradient"])
    assert tokens.shape == (1, model.cfg.max_tokens, model.cfg.merger.token_dim)
    assert 1 <= int(counts[0]) <= model.cfg.max_tokens
