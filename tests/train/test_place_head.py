"""`setok train --place-head`: generation places each token by a cell classification plus a position
in that cell (Setokim.place). Trained for real (a few steps), exported, and run by the runtime: the
bundle's regress_head computes what PyTorch's TokenHead computes, argmax over cells included."""

import json
import subprocess
import sys

import numpy as np
import onnx
import torch

from setok.model.setokim import Setokim, TokenHead


def test_train_export_and_run_with_the_place_head(tmp_path):
    ck, bundle = tmp_path / "ck", tmp_path / "b"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "train", "--preset", "tiny", "--steps", "12",
                           "--place-head", "--out", str(ck)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((ck / "config.json").read_text())["place_head"] is True
    history = json.loads((ck / "training_state.json").read_text())["history"]
    stage2 = [h for h in history if h["stage"] == 2]
    assert stage2 and all(h["place"] > 0 for h in stage2)
    assert all("place" not in h for h in history if h["stage"] == 1)

    proc = subprocess.run([sys.executable, "-m", "setok.cli", "export", str(ck), "--out", str(bundle)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]  # every stage validated against PyTorch at export
    graph = onnx.load(str(bundle / "regress_head.onnx")).graph
    assert "ArgMax" in {n.op_type for n in graph.node}

    from setok.runtime import Pipeline

    model = Setokim.from_pretrained(ck).eval()
    h = torch.randn(6, model.llm.config.hidden_size)
    with torch.no_grad():
        want = TokenHead(model)(h).numpy()
        placed = model.place.place(h).numpy()
    pipe = Pipeline.open(bundle, threads=1)
    got = pipe.stage("regress_head").run({"hidden": h.numpy()})["vision_tokens"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.allclose(got[:, :2], placed, atol=1e-5)
    image = pipe.generate_image("a red circle at the top left")
    assert image.image.shape[:2] == (model.cfg.encoder.image_size,) * 2


def test_place_steps_keeps_the_head_loss_to_the_last_stage2_steps(tmp_path):
    """`--place-steps 3`: the head's loss joins only the last 3 stage-2 steps (from the first step it
    crowded out the other losses, docs/generation.md), and the schedule is saved for --resume."""
    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "train", "--preset", "tiny", "--steps", "12",
                           "--place-head", "--place-steps", "3", "--out", str(ck)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((ck / "training_state.json").read_text())
    stage2 = [h for h in state["history"] if h["stage"] == 2]
    assert len(stage2) == 7 and state["place_steps"] == 3
    assert ["place" in h for h in stage2] == [False] * 4 + [True] * 3
    assert all(h["lm"] > 0 for h in stage2)
    # The head learns at a constant --place-lr (1.0 x tiny's 2e-3); everything else stays on the cosine.
    from setok.train.schedule import lr_scale
    from setok.train.trainer import PRESET_LR

    assert [h["lr"] for h in stage2] == [PRESET_LR["tiny"] * lr_scale(i, 7) for i in range(7)]
    assert {h["lr_place"] for h in stage2} == {PRESET_LR["tiny"]} and state["place_lr"] == 1.0
    assert all("lr_place" not in h for h in state["history"] if h["stage"] == 1)


def test_place_lr_none_keeps_the_head_on_the_cosine(tmp_path):
    from setok.train import TrainOptions, train
    from setok.train.schedule import lr_scale
    from setok.train.trainer import PRESET_LR

    ck = tmp_path / "ck"
    train(TrainOptions(preset="tiny", out=ck, steps=6, batch_size=4, place_head=True, place_steps=2, place_lr=None))
    state = json.loads((ck / "training_state.json").read_text())
    stage2 = [h for h in state["history"] if h["stage"] == 2]
    cosine = [PRESET_LR["tiny"] * lr_scale(i, len(stage2)) for i in range(len(stage2))]
    assert [h["lr"] for h in stage2] == cosine and [h["lr_place"] for h in stage2] == cosine
    assert ["place" in h for h in stage2][-2:] == [True, True]


def test_restart_steps_run_a_second_cosine_without_the_reconstruction_loss(tmp_path):
    """`--restart-steps 3`: stage 2's last 3 steps are a second cycle from --restart-lr x the preset's
    rate down to a tenth, the place loss on from its first step, the merger's reconstruction loss off
    (the tokens stay fixed, so a token bank drawn after the last step matches them)."""
    from setok.train.schedule import cosine_decay, lr_scale
    from setok.train.trainer import PRESET_LR

    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "train", "--preset", "tiny", "--steps", "12", "--tune-merger",
                           "--place-head", "--restart-steps", "3", "--restart-lr", "0.5", "--out", str(ck)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((ck / "training_state.json").read_text())
    stage2 = [h for h in state["history"] if h["stage"] == 2]
    assert len(stage2) == 7 and (state["restart_steps"], state["restart_lr"]) == (3, 0.5)
    assert ["place" in h for h in stage2] == [False] * 4 + [True] * 3
    assert ["recon" in h for h in stage2] == [True] * 4 + [False] * 3
    lr = PRESET_LR["tiny"]
    assert [h["lr"] for h in stage2] == [lr * lr_scale(i, 4) for i in range(4)] + [lr * 0.5 * cosine_decay(i / 3) for i in range(3)]
    assert [h["lr_place"] for h in stage2[4:]] == [h["lr"] for h in stage2[4:]]


def test_restart_steps_must_leave_a_first_cycle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "train", "--preset", "tiny", "--steps", "12",
                           "--restart-steps", "7", "--out", str(tmp_path / "ck")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--restart-steps 7: expected 1 to 6" in proc.stderr
    assert not (tmp_path / "ck").exists()
