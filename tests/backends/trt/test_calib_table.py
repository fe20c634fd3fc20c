"""The TensorRT calibration table's header names the TensorRT that will read it."""

import pytest
from click.testing import CliRunner

from setok.calibration import ranges as R
from setok.cli.main import main
from setok.errors import InputError

RANGES = {"x": (-1.0, 2.0), "y": (0.0, 0.5)}


def test_version_ints_follow_nvinfer_version():
    assert R.trt_version_int("10.3") == 100300 and R.trt_version_int("10.13.0.35") == 101300
    assert R.trt_version_int("11.1.0") == 110100
    for bad in ("ten", "7.2", "10.300"):
        with pytest.raises(InputError, match="--trt-version"):
            R.trt_version_int(bad)


def test_the_header_is_written_for_the_reader(tmp_path):
    with R.table_version("10.13") as header:
        assert header == 101300
        files = R.write_range_files(tmp_path, "llm", RANGES)
    version, scales = R.parse_trt_calib_table((tmp_path / files["calib_table.llm"]).read_text())
    assert version == 101300 and set(scales) == set(RANGES)
    assert R.trt_calib_table(RANGES, 100900).startswith("TRT-100900-EntropyCalibration2\n")


def test_default_reader_is_the_installed_tensorrt_else_jetpack(monkeypatch, tmp_path):
    monkeypatch.setattr(R, "installed_trt_version", lambda: "10.13.0.35")
    assert R.default_trt_version() == "10.13.0.35"
    monkeypatch.setattr(R, "installed_trt_version", lambda: None)
    monkeypatch.setattr(R, "JETSON_RELEASE", tmp_path / "nv_tegra_release")
    assert R.default_trt_version() == "10.3"
    with R.table_version(None) as header:
        assert header == 100300


def test_calibrate_refuses_a_bad_trt_version(tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path), "--out", str(tmp_path / "o"), "--trt-version", "x"])
    assert result.exit_code == 2 and "--trt-version 'x'" in result.output, result.output
