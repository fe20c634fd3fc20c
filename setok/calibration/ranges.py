"""Activation ranges: computed with onnxruntime's calibrators, written as JSON and a TensorRT table.

Two findings about onnxruntime's calibrators (1.31) shape this module:

* Entropy returned exactly the MinMax ranges. `create_calibrator` defaults Entropy to
  num_bins=128 and num_quantized_bins=128; the KL search in
  `HistogramCollector.get_entropy_threshold` walks thresholds
  `range(num_quantized_bins // 2, num_bins // 2 + 1)`, i.e. ONE candidate: the whole histogram,
  [-amax, amax], which is then clipped to the observed [min, max] -- the MinMax range. (It only
  differs when later batches widen the histogram.) `quantize_static` gives no way to set
  num_bins, so we run the calibrator ourselves with num_bins=512 (193 candidate thresholds of
  128 quantized bins; 2048 as in TensorRT is ~6x slower in ORT's pure-Python search and, with a
  few hundred samples, the sparse histogram makes KL pick very tight ranges) and hand the ranges
  to `quantize_static` through its calibration cache.
* Histogram methods fail on ragged inputs when given several feeds at once (`np.asarray` over a
  list of differently shaped arrays: the LLM's sequence length, the projector's token count vary),
  so histogram calibrators are fed one feed per `collect_data` call (histograms merge across
  calls). MinMax reduces to scalars in-graph and takes all feeds in one call.

Ranges are computed on the tensors of the quantized op types (what `quantize_static` reads) with
the chosen method, and on every other float activation with MinMax, so the range files cover
every activation tensor of the fp32 graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import (
    TensorData,
    TensorsData,
    create_calibrator,
    save_tensors_data,
)

from setok.calibration.feeds import FeedReader
from setok.errors import InputError
from setok.plugins.versions import JETPACK6_TRT, version_tuple

log = logging.getLogger(__name__)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
# See the module docstring for why Entropy needs num_bins > num_quantized_bins.
CALIB_OPTIONS = {"minmax": {}, "entropy": {"num_bins": 512, "num_quantized_bins": 128},
                 "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True}}
# The table's header names the TensorRT that reads it, "TRT-<major*10000 + minor*100 + patch>-..."
# (NvInferVersion.h's NV_TENSORRT_MAJOR/MINOR/PATCH). A TensorRT may treat a table with another
# version as stale and calibrate again, with no data here (the calibrator only reads), so the header
# is written for the reader: `setok calibrate --trt-version`, default the installed TensorRT, JetPack
# 6's 10.3 on a Jetson, else 10.3 (logged).
TRT_VERSION = 100300  # TensorRT 10.3.0: the fallback reader
JETSON_RELEASE = Path("/etc/nv_tegra_release")
_TABLE_VERSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("trt_table_version", default=None)
QMAX = 127.0  # symmetric int8


def compute_ranges(model: Path, feeds: list[dict], method: str, op_types: list[str] | None,
                   work: Path) -> dict[str, tuple[float, float]]:
    """tensor -> (min, max) over `feeds` with the given method; op_types=None: every float tensor."""
    calib = create_calibrator(Path(model), op_types, augmented_model_path=str(Path(work) / "augmented.onnx"),
                              calibrate_method=METHODS[method], extra_options=CALIB_OPTIONS[method])
    calib.execution_providers = ["CPUExecutionProvider"]
    if method == "minmax":
        calib.collect_data(FeedReader(feeds))
    else:
        for feed in feeds:  # one at a time: histograms need equal shapes within one call
            calib.collect_data(FeedReader([feed]))
    data = calib.compute_data()
    return {name: (float(np.min(td.range_value[0])), float(np.max(td.range_value[1]))) for name, td in data.items()}


def stage_ranges(model: Path, feeds: list[dict], method: str, op_types: list[str]) -> tuple[dict, list[str]]:
    """The method's ranges on quantized-op tensors, MinMax on every other float activation.

    Returns (ranges, unranged): tensors with no finite range (attention masks holding -inf, the
    empty past of an LLM prefill) cannot be int8 and are left out of every range file.
    """
    with tempfile.TemporaryDirectory(prefix="setok-calib-") as work:
        ranges = compute_ranges(model, feeds, "minmax", None, Path(work))
        if method != "minmax":
            ranges.update(compute_ranges(model, feeds, method, op_types, Path(work)))
    unranged = sorted(k for k, (lo, hi) in ranges.items() if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi))
    if unranged:
        log.info("%d tensors have no finite range and stay out of the range files: %s", len(unranged), unranged)
    return {k: v for k, v in ranges.items() if k not in unranged}, unranged


def save_cache(ranges: dict[str, tuple[float, float]], method: str, path: Path) -> Path:
    """onnxruntime's calibration cache, read back by quantize_static(calibration_cache_path=...)."""
    data = {k: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for k, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(METHODS[method], data), path)
    return path


def range_table(ranges: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, (lo, hi) in sorted(ranges.items()):
        amax = max(abs(lo), abs(hi))
        out[name] = {"min": lo, "max": hi, "amax": amax, "scale": amax / QMAX}
    return out


def trt_version_int(version: str) -> int:
    """'10.13.0.35' -> 101300; InputError for anything that is not a TensorRT 8+ version."""
    try:
        parts = (*version_tuple(version), 0, 0)[:3]
    except ValueError:
        parts = (0,)
    if parts[0] < 8 or any(p > 99 for p in parts[1:3]):
        raise InputError(f"--trt-version {version!r}; expected a TensorRT version such as 10.3 or 10.13.0")
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def installed_trt_version() -> str | None:
    """The installed TensorRT's version, read from package metadata (no import)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return None


def default_trt_version() -> str:
    """Who will read the table: the installed TensorRT, else JetPack 6's on a Jetson, else 10.3 (logged)."""
    found = installed_trt_version()
    if found:
        return found
    if not JETSON_RELEASE.exists():
        log.warning("no TensorRT here: the calibration tables are written for TensorRT %s "
                    "(pass --trt-version for another)", JETPACK6_TRT)
    return JETPACK6_TRT


@contextlib.contextmanager
def table_version(version: str | None) -> Iterator[int]:
    """Within the block, calibration tables are written for TensorRT `version` (None: the default)."""
    value = trt_version_int(version or default_trt_version())
    token = _TABLE_VERSION.set(str(value))
    try:
        yield value
    finally:
        _TABLE_VERSION.reset(token)


def current_table_version() -> int:
    value = _TABLE_VERSION.get()
    return int(value) if value else trt_version_int(default_trt_version())


def trt_calib_table(ranges: dict[str, tuple[float, float]], version: int | None = None) -> str:
    """TensorRT's calibration cache text: a header, then `name: <big-endian hex of float32 scale>`."""
    lines = [f"TRT-{current_table_version() if version is None else version}-EntropyCalibration2"]
    for name, entry in range_table(ranges).items():
        # A zero scale (a constant-zero tensor) would make TensorRT divide by zero; use the
        # smallest normal float instead, which quantizes that tensor to exact zeros all the same.
        scale = max(entry["scale"], float(np.finfo(np.float32).tiny))
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def parse_trt_calib_table(text: str) -> tuple[int, dict[str, float]]:
    """(version, tensor -> scale) from a TensorRT calibration cache (the inverse of trt_calib_table)."""
    head, *rows = text.strip().splitlines()
    parts = head.split("-")
    if len(parts) != 3 or parts[0] != "TRT" or parts[2] != "EntropyCalibration2":
        raise ValueError(f"not a TensorRT EntropyCalibration2 table header: {head!r}")
    scales = {}
    for row in rows:
        name, _, hexval = row.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval))[0]
    return int(parts[1]), scales


def write_range_files(root: Path, stage: str, ranges: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Write calibration/<stage>.ranges.json and .calib.cache under root; returns role -> relative path."""
    folder = Path(root) / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    rel_json, rel_cache = f"calibration/{stage}.ranges.json", f"calibration/{stage}.calib.cache"
    (Path(root) / rel_json).write_text(json.dumps(range_table(ranges), indent=1, sort_keys=True) + "\n")
    (Path(root) / rel_cache).write_text(trt_calib_table(ranges))
    return {f"ranges.{stage}": rel_json, f"calib_table.{stage}": rel_cache}
