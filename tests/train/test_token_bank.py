"""The token bank (setok/model/bank.py, setok/train/bank.py): a checkpoint's own tokens of training
scenes, and generated tokens snapped onto the nearest. Built for real from a trained tiny checkpoint
(`setok train --token-bank`, `setok bank`), reloaded, exported, and run by ONNX Runtime."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from setok.data.items import item_stream
from setok.errors import InputError
from setok.model.setokim import Setokim, TokenHead
from setok.train.bank import attach_bank, bank_tokens


def setok(*args):
    return subprocess.run([sys.executable, "-m", "setok.cli", *map(str, args)], capture_output=True, text=True, check=False)


def test_generated_tokens_keep_their_place_and_take_the_nearest_bank_tokens_content(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    h = torch.randn(7, model.llm.config.hidden_size)
    with torch.no_grad():
        plain = TokenHead(model)(h)
        stream = item_stream("synthetic", model.cfg.encoder.image_size, 0)
        attach_bank(model, bank_tokens(model, stream, size=48, scenes=20))
        snapped = TokenHead(model)(h)
    bank = model.bank.tokens
    assert model.cfg.token_bank == 48 and bank.shape == (48, model.cfg.merger.token_dim - 2)
    assert len(torch.unique(bank, dim=0)) > 40  # real, distinct tokens, not a constant
    assert torch.equal(snapped[:, :2], plain[:, :2])  # the place is the head's
    scaled = torch.cdist(plain[:, 2:] * model.bank.inv_scale, bank * model.bank.inv_scale)  # (7, 48)
    torch.testing.assert_close(snapped[:, 2:], bank[scaled.argmin(1)], atol=1e-6, rtol=0)  # brute force agrees
    assert len(torch.unique(scaled.argmin(1))) > 1  # different hidden states, different bank tokens


def test_a_bank_needs_enough_tokens(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    stream = item_stream("synthetic", model.cfg.encoder.image_size, 0)
    with pytest.raises(InputError, match="give at most 48"):  # 3 scenes x 16 tokens, before any work
        bank_tokens(model, stream, size=10_000, scenes=3)
    with pytest.raises(InputError, match="gave only"):  # possible, but these scenes have fewer tokens
        bank_tokens(model, stream, size=47, scenes=3)
    assert len(bank_tokens(model, stream, size=47, scenes=3, strict=False)) < 47  # at the end of a run: all


def test_setok_bank_writes_a_checkpoint_that_reloads_exports_and_runs_the_same(tiny_ckpt, tmp_path):
    ck, bundle = tmp_path / "ck", tmp_path / "b"
    proc = setok("bank", tiny_ckpt, "--out", ck, "--size", 40, "--scenes", 10)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((ck / "config.json").read_text())["token_bank"] == 40
    assert json.loads((tiny_ckpt / "config.json").read_text())["token_bank"] == 0  # --out: the source kept
    model = Setokim.from_pretrained(ck)
    assert model.bank is not None and model.bank.tokens.abs().sum() > 0

    proc = setok("export", ck, "--out", bundle)
    assert proc.returncode == 0, proc.stderr[-2000:]  # regress_head validated against PyTorch at export
    graph = onnx.load(str(bundle / "regress_head.onnx")).graph
    assert {"ArgMin", "Gather"} <= {n.op_type for n in graph.node}
    bank_sized = [i for i in graph.initializer if list(i.dims) in ([40, 30], [30, 40])]
    assert len(bank_sized) == 1, [i.name for i in bank_sized]  # the bank is stored once
    from setok.backends.trt.lint import lint_bundle
    from setok.runtime import Pipeline

    assert not [f for f in lint_bundle(bundle) if f.stage == "regress_head" and f.severity == "error"]
    h = torch.randn(9, model.llm.config.hidden_size)
    with torch.no_grad():
        want = TokenHead(model)(h).numpy()
    got = Pipeline.open(bundle, threads=1).stage("regress_head").run({"hidden": h.numpy()})["vision_tokens"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    rows = {tuple(r) for r in model.bank.tokens.numpy().round(5)}
    assert all(tuple(r) in rows for r in got[:, 2:].round(5))  # every generated token's content is a bank row


def test_setok_bank_refuses_a_bank_larger_than_its_scenes_give_and_leaves_the_checkpoint(tiny_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    for size, scenes, says in ((100_000, 2, "at most 32"), (30, 2, "gave only")):  # up front; after drawing
        proc = setok("bank", ck, "--size", size, "--scenes", scenes)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: token bank") and says in last, proc.stderr
    bad = setok("bank", ck, "--device", "gpu0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --device gpu0"), bad.stderr
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_train_with_a_token_bank_draws_it_after_the_last_step(tmp_path):
    from setok.train import TrainOptions, train

    ck = train(TrainOptions(preset="tiny", out=tmp_path / "ck", steps=4, batch_size=4, token_bank=64))
    model = Setokim.from_pretrained(ck)
    assert model.cfg.token_bank == 64 and len(torch.unique(model.bank.tokens, dim=0)) > 50
    with pytest.raises(InputError, match="--token-bank"):
        train(TrainOptions(preset="tiny", out=tmp_path / "bad", steps=4, token_bank=-1))
