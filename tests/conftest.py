"""Session fixtures: one tiny checkpoint trained for real, shared by every test that needs one."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from setok.train import TrainOptions, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return train(TrainOptions(preset="tiny", out=out, steps=16, ckpt_every=1000))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    from setok.export.onnx import export_bundle

    return export_bundle(tiny_ckpt, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_newest_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """`setok export --llm-logits newest` of the tiny checkpoint (eager attention, the LM head for each
    row's newest token only), through the CLI."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("bundle") / "tiny_newest"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "export", str(tiny_ckpt), "--out", str(out),
                           "--llm-logits", "newest"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory) -> Path:
    """The shipped small checkpoint exported once, for the tests that check content (masks against
    the scene's, answers that differ between scenes, threads that could mix images up): the barely
    trained tiny model answers alike for every image."""
    from setok.config import SHIPPED_CHECKPOINT
    from setok.export.onnx import export_bundle

    return export_bundle(SHIPPED_CHECKPOINT, tmp_path_factory.mktemp("shipped") / "small")
