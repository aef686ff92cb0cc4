#!/usr/bin/env bash
# The GPU check (issues 12, 24), one prepared command: on a machine with one GPU it sets up the
# project (infra/setup.sh: the CUDA torch build that the driver runs, DeepSpeed without compiling),
# then measures, within 8 minutes, StyleGAN2 s/kimg (the SCB-GAN spec under DDP and DeepSpeed ZeRO-1,
# StyleGAN2-ADA's published paper256 config as the anchor), the diffusion UNet's images/s and model
# FLOP utilisation, the shard stream's images/s into the GPU and the evaluation's feature throughput,
# and prints one table (benchmarks/gpu_check.py says what each row measures).
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--inception PATH/inception-2015-12-05.pt]
#   bash benchmarks/gpu_check.sh --smoke      # the same code on the CPU in seconds (a test runs it)
#
# Python: the venv that infra/setup.sh makes (ORBITGEN_VENV, default .venv), never the system's
# python3; ORBITGEN_PYTHON names an interpreter already set up instead (the tests pass theirs) and
# skips the set-up. The set-up's time is printed apart from the check's budget: every row has its
# own, and past GPU_CHECK_LIMIT seconds (default 460) the run is interrupted and prints what it
# measured so far. Without CUDA the check exits non-zero in one line, except with --smoke.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${ORBITGEN_PYTHON:-} ]]; then
  PY=$ORBITGEN_PYTHON
  unset GPU_CHECK_SETUP_S   # no set-up ran
else
  t0=$(date +%s.%N)
  bash infra/setup.sh || { echo "gpu_check: set-up failed (bash infra/setup.sh, above)" >&2; exit 1; }
  PY=${ORBITGEN_VENV:-.venv}/bin/python
  GPU_CHECK_SETUP_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  export GPU_CHECK_SETUP_S   # gpu_check.py prints it apart from the check's own time
fi
if [[ ! -x $PY ]]; then
  echo "gpu_check: no Python at $PY after set-up (run bash infra/setup.sh)" >&2
  exit 1
fi
export GPU_CHECK_LIMIT=${GPU_CHECK_LIMIT:-460}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=15 "${GPU_CHECK_LIMIT:-460}" "$PY" benchmarks/gpu_check.py "$@"
