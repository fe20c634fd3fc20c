"""`setok bench`: the JSON schema, interleaved comparison, the plot, on real targets."""

import json
import subprocess
import sys

import pytest
from PIL import Image


def test_bench_compare_schema(tiny_ckpt, tiny_bundle, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "bench", str(tiny_ckpt), str(tiny_bundle), "--compare",
                           "--n", "4", "--warmup", "1", "--batch", "2", "--json", str(out), "--plot", str(png)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"machine", "n", "warmup", "targets", "e2e_ratio", "prefill_speedup", "batch", "peak_rss_mb"} <= set(r)
    assert r["spin"] is False, "interleaved targets: ORT threads sleep unless --spin"
    assert len(r["targets"]) == 2 and len(r["e2e_ratio"]) == 1 and r["e2e_ratio"][0] > 0
    assert len(r["prefill_speedup"]) == 1 and r["prefill_speedup"][0] > 0
    for t in r["targets"]:
        assert {"name", "open_seconds", "stages", "e2e_median_ms", "e2e_p90_ms", "decode_ms_per_token", "tokens_per_image",
                "ttft_ms", "decode_tokens_per_s", "batch"} <= set(t)
        assert t["ttft_ms"] <= t["e2e_median_ms"] * 1.5
        b = t["batch"]
        assert b["size"] == 2 and b["runs"] >= 1 and b["e2e_p90_ms"] >= b["e2e_median_ms"] > 0
        assert abs(b["per_image_ms"] * 2 - b["e2e_median_ms"]) < 1e-6
        assert {"encoder", "cluster", "merger", "llm_prefill"} <= set(t["stages"])
        assert all(v["p90_ms"] >= v["median_ms"] >= 0 for v in t["stages"].values())
    assert r["targets"][0]["tokens_per_image"] == r["targets"][1]["tokens_per_image"], "same clustering both sides"
    # The memory-bandwidth bound of decode: this machine's copy bandwidth over each target's LLM weight bytes.
    assert r["copy_bandwidth_gbs"] > 0
    for t in r["targets"]:
        assert t["weight_mb_per_token"] > 0 and "open_rss_mb" in t
        assert t["bound_tokens_per_s"] == pytest.approx(r["copy_bandwidth_gbs"] * 1e9 / (t["weight_mb_per_token"] * 2**20), rel=1e-3)
        if t["decode_tokens_per_s"]:  # (the PyTorch target times prefill and decode as one: no decode rate)
            assert t["fraction_of_bound"] == pytest.approx(t["decode_tokens_per_s"] / t["bound_tokens_per_s"])
        else:
            assert t["fraction_of_bound"] is None
    assert Image.open(png).size[0] == 640


def test_bench_two_targets_need_compare(tiny_ckpt, tiny_bundle):
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "bench", str(tiny_ckpt), str(tiny_bundle)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "--compare" in proc.stderr


def test_forced_decode_times_every_target_past_eos(tiny_ckpt, tiny_bundle, tmp_path):
    """--decode-tokens: PyTorch and ONNX Runtime each time that many greedy steps per image, whatever
    the model answers (a random-weight LLM says <eos> first), and the bandwidth bound uses them."""
    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, "-m", "setok.cli", "bench", str(tiny_ckpt), str(tiny_bundle), "--compare",
                           "--n", "2", "--warmup", "0", "--batch", "0", "--decode-tokens", "4", "--spin", "--json", str(out)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["decode_tokens"] == 4 and r["spin"] is True
    lengths = set()
    for t in r["targets"]:
        assert t["forced_decode_p90_ms"] >= t["forced_decode_ms_per_token"] > 0 and t["forced_prefill_ms"] > 0
        assert t["decode_tokens_per_s"] == pytest.approx(1000 / t["forced_decode_ms_per_token"])
        assert t["fraction_of_bound"] == pytest.approx(t["decode_tokens_per_s"] / t["bound_tokens_per_s"])
        lengths.add(t["prompt_len"])
    assert len(lengths) == 1, "both sides prefill the same prompt"
