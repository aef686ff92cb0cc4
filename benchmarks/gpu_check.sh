#!/usr/bin/env bash
# The GPU check (issue 12), one prepared command: on a machine with one GPU it measures, within
# 8 minutes, StyleGAN2 s/kimg (DDP engine, DeepSpeed ZeRO-1), the diffusion UNet's images/s and
# model FLOP utilisation, the shard stream's images/s into the GPU and the evaluation's feature
# throughput, and prints one table (benchmarks/gpu_check.py says what each row measures).
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--inception PATH/inception-2015-12-05.pt]
#   bash benchmarks/gpu_check.sh --smoke      # the same code on the CPU in seconds (a test runs it)
#
# Python: $PYTHON, else the project's .venv, else python3. Every row has its own time budget; past
# GPU_CHECK_LIMIT seconds (default 460) the run is interrupted and prints what it measured so far.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=15 "${GPU_CHECK_LIMIT:-460}" "$PY" benchmarks/gpu_check.py "$@"
