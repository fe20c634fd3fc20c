"""`setok bench BUNDLE --frame-loop`: JSON with time to first token with and without the prefix cache."""

import json

from click.testing import CliRunner

from setok.cli.main import main


def test_frame_loop_bench_reports_ttft_with_and_without_the_cache(tiny_bundle):
    r = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--frame-loop", "--n", "3", "--warmup", "1",
                                  "--threads", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["cached"]["ttft_ms_median"] > 0 and out["uncached"]["ttft_ms_median"] > 0
    assert out["same_first_tokens"] and out["cache"]["hits"] == 3 and out["cache"]["misses"] == 1


def test_frame_loop_needs_one_bundle(tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tmp_path), "--frame-loop"])
    assert r.exit_code == 2 and "expected one bundle directory" in r.output


def test_the_package_is_typed():
    from importlib.resources import files

    assert files("setok").joinpath("py.typed").is_file()
