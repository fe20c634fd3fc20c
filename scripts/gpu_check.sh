#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine (torch, triton, cuda-python; TensorRT optional):
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--only triton_kernels,aot_ptx,...]
# Writes DIR/gpu_check.json (default gpu-check/); exit 0 all passed or skipped, 1 a check failed,
# 2 bad input. The checks stop themselves within 8 minutes; `timeout` is the backstop.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the checks need compiled kernels
exec timeout --signal=INT 8m python -m setok.cli gpu-check "$@"
