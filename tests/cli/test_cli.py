"""The `setok` console script, run for real in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EVAL_KEYS = {
    "fg_ari", "tokens_mean", "tokens_objects_spearman", "vqa_accuracy", "caption_exact", "recon_psnr",
    "baseline_psnr", "refseg_miou", "gen_psnr", "pixel_dpc_fg_ari", "patches", "gen_ceiling_psnr",
}


def setok(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "setok.cli", *map(str, args)], check=False, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"setok {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_help_lists_commands():
    out = setok("--help").stdout
    for cmd in ("train", "eval", "demo"):
        assert cmd in out


def test_eval_writes_every_metric(tiny_ckpt, tmp_path):
    setok("eval", tiny_ckpt, "--json", tmp_path / "m.json", "--n", 8)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert EVAL_KEYS <= set(metrics)
    assert metrics["patches"] == 256
    assert 0 < metrics["baseline_psnr"] < 60 and metrics["tokens_mean"] >= 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "/nonexistent/ckpt"], "no such checkpoint"),
        (["train", "--preset", "tiny", "--out", "{tmp}/x", "--steps", "1"], "--steps 1"),
        (["train", "--preset", "tiny", "--out", "{tmp}/x", "--data", "{tmp}/nofolder"], "nofolder"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle, tmp_path):
    proc = setok(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists(), "nothing half-written"


def test_palette_on_captioned_photos_is_refused_before_training(tmp_path):
    """--palette learns each pixel's class from instance masks, which a captions folder has none of."""
    photos = _photos(tmp_path / "photos")
    rows = [json.dumps({"image": p.name, "text": "a photo"}) for p in sorted(photos.iterdir())]
    (photos / "captions.jsonl").write_text("\n".join(rows) + "\n")
    proc = setok("train", "--preset", "tiny", "--out", tmp_path / "x", "--steps", 4, "--data", photos,
                 "--palette", 4, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "instance masks" in lines[0], proc.stderr
    assert not (tmp_path / "x").exists(), "nothing half-written"


def test_corrupt_checkpoint_is_a_clean_error(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "config.json").write_text("{not json")
    proc = setok("eval", bad, "--n", 2, check=False)
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["train", "--preset", "tiny", "--steps", 12, "--seed", 3, "--ckpt-every", 2]
    setok(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "setok.cli", *map(str, args), "--out", killed],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "training_state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if state.exists():
        assert not json.loads(state.read_text())["finished"], "killed before the end"
    setok(*args, "--out", killed, "--resume")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    assert json.loads((killed / "training_state.json").read_text())["finished"]


def _photos(folder: Path) -> Path:
    """Photo-like images of several sizes and modes (what --images gets from users)."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:97, 0:130]
    base = np.stack([xx * 2 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(folder / "rgb.jpg")
    Image.fromarray(noisy).convert("L").save(folder / "gray.png")
    Image.fromarray(noisy).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(noisy).convert("P").save(folder / "palette.png")
    Image.fromarray(noisy[:40, :200 % 130]).convert("CMYK").save(folder / "cmyk.jpg")
    return folder


def test_export_run_parity_eval_on_a_bundle(tiny_ckpt, tmp_path):
    bundle = tmp_path / "bundle"
    setok("export", tiny_ckpt, "--out", bundle)
    assert (bundle / "manifest.json").is_file()
    scene = tmp_path / "scene.png"
    from PIL import Image

    from setok.data.items import eval_items

    Image.fromarray(eval_items(1, seed=9)[0].image).save(scene)
    out = setok("run", bundle, "--image", scene, "--ask", "how many objects are there", "--segment", "the red circle",
                "--save-masks", tmp_path / "masks.png", "--generate", "a small red circle at center on a navy gradient",
                "--save-image", tmp_path / "gen.png", "--json").stdout
    result = json.loads(out)
    assert {"num_tokens", "caption", "answer", "segment_tokens", "timings", "generated_tokens"} <= set(result)
    assert Image.open(tmp_path / "masks.png").size == (3 * 64 * 4, 64 * 4)
    assert Image.open(tmp_path / "gen.png").size == (64, 64)
    setok("parity", tiny_ckpt, bundle, "--n", 2, "--json", tmp_path / "parity.json")
    scenes = json.loads((tmp_path / "parity.json").read_text())
    assert scenes["passed"] and scenes["rounding_sensitive_images"] == 0
    photos = setok("parity", tiny_ckpt, bundle, "--images", _photos(tmp_path / "photos"), "--n", 5, "--json", tmp_path / "photos.json")
    assert "PASS" in photos.stdout
    # A 16-step model on photos can sit on a float32 near-tie; most images must still be gated.
    assert json.loads((tmp_path / "photos.json").read_text())["rounding_sensitive_images"] <= 2
    setok("eval", bundle, "--backend", "onnxruntime", "--n", 3, "--json", tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert EVAL_KEYS <= set(metrics) and metrics["backend"] == "onnxruntime"


def test_run_needs_something_to_do(tiny_bundle):
    proc = setok("run", tiny_bundle, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: nothing to do")


def test_doctor_says_whether_a_bundle_runs_here(tiny_bundle, tmp_path):
    import shutil

    env = json.loads(setok("doctor", tiny_bundle, "--json").stdout)
    assert env["bundle"]["runs_here"] and env["packages"]["onnxruntime"] and "CPUExecutionProvider" in env["onnxruntime_providers"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "merger.onnx").write_bytes(b"tampered")
    proc = setok("doctor", broken, "--json", check=False)
    assert proc.returncode == 1
    assert "merger.onnx" in json.loads(proc.stdout)["bundle"]["problems"][0]


def test_frame_loop_example(tiny_bundle, tmp_path):
    from PIL import Image

    from setok.data.items import eval_items

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, it in enumerate(eval_items(3, seed=60)):
        Image.fromarray(it.image).save(frames / f"{i:03d}.png")
    example = Path(__file__).parents[2] / "examples" / "frame_loop.py"
    out = subprocess.run([sys.executable, str(example), str(tiny_bundle), str(frames), "how many objects are there"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3 and all(line.startswith(f"{i:03d}.png:") and line.endswith("ms") for i, line in enumerate(out))
