"""`setok gpu-check --dry-run` (scripts/gpu_check.sh): what it would run, and its input checks. Runs anywhere."""

import json
import subprocess
from pathlib import Path

from click.testing import CliRunner

from setok.cli.gpu_check import CHECKS, plan
from setok.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_check_and_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by the kernel tests of this process
    result = CliRunner().invoke(main, ["gpu-check", "--dry-run", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dry_run"] and report["budget_s"] <= 480
    assert list(report["checks"]) == [c.name for c in CHECKS] == ["triton_kernels", "aot_ptx", "reference_model",
                                                                   "trt_runner", "train_cuda", "tensorrt_engines"]
    for name, c in report["checks"].items():
        assert c["would"] == ("skip" if c["missing"] else "run"), name
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_dry_run_refuses_a_file_as_out_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "f").write_text("")
    result = CliRunner().invoke(main, ["gpu-check", "--dry-run", "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "is not a folder" in result.output
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" in CliRunner().invoke(main, ["gpu-check", "--dry-run", "--out", str(tmp_path)]).output


def test_only_names_known_checks(tmp_path):
    result = CliRunner().invoke(main, ["gpu-check", "--only", "warp_drive", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown checks" in result.output


def test_the_script_is_one_command_with_dry_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["checks"].keys() == plan(tmp_path).get("checks").keys()
