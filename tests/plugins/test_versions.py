"""The TensorRT / Triton versions are said once (setok/plugins/versions.py); pyproject, README and
`setok doctor` follow them."""

import re
from pathlib import Path

import setok
from setok.cli.doctor import tensorrt_paths
from setok.plugins.versions import (
    TRITON_MIN,
    TRITON_TESTED,
    TRT_PYTHON_PLUGIN_MIN,
    TRT_STANDARD_MIN,
    dotted,
    ptx_isa_for_cuda,
)

ROOT = Path(setok.__file__).resolve().parents[1]


def _extra(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(rf"^{name} = \[(.*?)^\]", text, re.DOTALL | re.MULTILINE)[1]


def test_pyproject_pins_follow_the_constants():
    gpu, dev, jetson = _extra("gpu"), _extra("dev"), _extra("jetson")
    assert f'"tensorrt>={dotted(TRT_PYTHON_PLUGIN_MIN)}"' in gpu
    assert f'"triton>={dotted(TRITON_MIN)}"' in gpu and f'"triton>={dotted(TRITON_MIN)};' in dev
    assert f'"tensorrt-cu12-bindings>={dotted(TRT_PYTHON_PLUGIN_MIN)},' in dev  # the CPU twin's TensorRT
    assert "tensorrt" not in re.sub(r"#.*", "", jetson)  # JetPack's TensorRT comes from apt


def test_readme_states_the_same_versions():
    section = (ROOT / "README.md").read_text().split("## GPUs and Jetson")[1].split("\n## ")[0]
    assert f"TensorRT >= {dotted(TRT_STANDARD_MIN)}" in section
    assert f"TensorRT >= {dotted(TRT_PYTHON_PLUGIN_MIN)}, Triton >= {dotted(TRITON_MIN)} (checked with " \
           f"{dotted(TRITON_TESTED)})" in section
    assert "--system-site-packages" in section and "'.[jetson]'" in section and "scripts/gpu_check.sh" in section


def test_ptx_isa_per_cuda_release():
    assert [ptx_isa_for_cuda(12, m) for m in (0, 4, 5, 6, 8, 9)] == [80, 84, 85, 85, 87, 88]
    assert ptx_isa_for_cuda(13, 0) == 90


def test_doctor_says_which_path_and_why():
    jetpack = tensorrt_paths("10.3.0.30", False, None)
    assert jetpack["standard_ops"].startswith("yes") and "10.9" in jetpack["python_plugin"]
    assert jetpack["python_plugin"].startswith("no")
    x86 = tensorrt_paths("10.13.0.35", True, "3.9.0")
    assert x86["python_plugin"].startswith("yes") and x86["standard_ops"].startswith("yes")
    assert "Triton >= 3.2" in tensorrt_paths("10.13.0.35", True, "3.1.0")["python_plugin"]
    assert "tensorrt.plugin" in tensorrt_paths("10.13.0.35", False, "3.9.0")["python_plugin"]
    assert all(v.startswith("no: TensorRT is not installed") for v in tensorrt_paths(None, False, None).values())
