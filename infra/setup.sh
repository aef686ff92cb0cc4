#!/usr/bin/env bash
# Creates ./.venv with orbitgen and its dependencies (idempotent: a second run with an
# unchanged pyproject.toml, this script, torch build and GPU presence returns at once).
# CPU torch unless nvidia-smi finds a GPU; with a GPU, the CUDA torch build that the driver runs
# (nvidia-smi's "CUDA Version"), checked with torch.cuda.is_available() after installing.
# uv installs (parallel downloads and unpacking, ~3x pip here); pip where uv cannot be had.
#
#   bash infra/setup.sh               # set up (or do nothing when the stamp matches)
#   bash infra/setup.sh --dry-run     # print what it would install, install nothing (also ORBITGEN_SETUP_DRY_RUN=1)
#   bash infra/setup.sh --torch-args  # print only the pip arguments of the torch build (the cluster's setup_commands)
#
# Variables: PYTHON (the interpreter that makes the venv), ORBITGEN_VENV (default .venv),
# ORBITGEN_CPU_TORCH (the CPU pin, 2.13.0), ORBITGEN_TORCH_CUDA (force a wheel line: cu126, ..., or
# "cpu"), ORBITGEN_GPU_TORCH (force the torch version of that line).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${ORBITGEN_VENV:-.venv}
mode=install
[[ ${ORBITGEN_SETUP_DRY_RUN:-0} == 1 ]] && mode=dry-run
case ${1:-} in
  --dry-run) mode=dry-run ;;
  --torch-args) mode=torch-args ;;
  "") ;;
  *) echo "setup.sh: unknown argument $1 (allowed: --dry-run, --torch-args)" >&2; exit 2 ;;
esac
cpu_torch=${ORBITGEN_CPU_TORCH:-2.13.0}

# --- Which torch: a GPU is one that `nvidia-smi -L` lists; the wheel line is the newest CUDA line
# that the driver's CUDA version runs (a wheel built for a newer CUDA than the driver imports, but
# torch then sees no GPU). Each line's torch is pinned: the newest release that ships that line
# and that we know of; the current lines take the CPU pin, so GPU and CPU run the same torch.
gpu=0
driver_cuda=none
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
  driver_cuda=${driver_cuda:-unknown}
fi

# Prints "<line> <torch version>" for a driver CUDA version "major.minor"; nothing below CUDA 11.8.
cuda_line() {
  local major=${1%%.*} minor=${1#*.}
  local v=$((major * 100 + minor))
  if   ((v >= 1300)); then echo "cu130 $cpu_torch"
  elif ((v >= 1208)); then echo "cu128 $cpu_torch"
  elif ((v >= 1206)); then echo "cu126 2.9.1"     # 2.9 is the last release known here to ship cu126
  elif ((v >= 1204)); then echo "cu124 2.6.0"     # the last release with cu124
  elif ((v >= 1201)); then echo "cu121 2.5.1"     # the last release with cu121
  elif ((v >= 1108)); then echo "cu118 2.7.1"     # the last release with cu118
  fi
}

line=cpu
torch_version=$cpu_torch
if [[ -n ${ORBITGEN_TORCH_CUDA:-} ]]; then
  line=$ORBITGEN_TORCH_CUDA
  [[ $line == cpu ]] || torch_version=${ORBITGEN_GPU_TORCH:-$cpu_torch}
elif ((gpu)); then
  if [[ ! $driver_cuda =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "setup.sh: a GPU is listed but nvidia-smi prints no 'CUDA Version'; set ORBITGEN_TORCH_CUDA (e.g. cu128)" >&2
    exit 1
  fi
  read -r line torch_version <<<"$(cuda_line "$driver_cuda")" || true
  if [[ -z ${line:-} ]]; then
    echo "setup.sh: the driver's CUDA $driver_cuda is older than any torch build (CUDA >= 11.8 needed); update the driver" >&2
    exit 1
  fi
  torch_version=${ORBITGEN_GPU_TORCH:-$torch_version}
fi
if [[ $line == cpu ]]; then
  # The +cpu wheel where pip's find-links has it (this machine); elsewhere the registry's default.
  torch_args=("torch==$torch_version" numpy)
else
  # The full local version pins the line: a local +cpu wheel of the same version must not win.
  torch_args=("torch==$torch_version+$line" --index-url "https://download.pytorch.org/whl/$line")
fi
if [[ $mode == torch-args ]]; then echo "${torch_args[*]}"; exit 0; fi

# DeepSpeed ships as an sdist whose setup.py checks every op's compatibility even when it builds
# none; with CUDA torch present, the inference/fp-quantizer/evoformer checks run nvcc and abort
# the install without a CUDA toolkit. DS_BUILD_OPS=0: compile nothing now (JIT on first use);
# DS_IGNORE_CUDA_DETECTION=1: skip the nvcc-based checks. Neither changes a CPU install.
export DS_BUILD_OPS=0 DS_IGNORE_CUDA_DETECTION=1

stamp=$venv/.orbitgen-setup
# The torch build and the GPU's presence are part of it: a CPU venv is rebuilt once a GPU appears.
want="$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16) torch=${torch_args[0]#torch==} build=$line gpu=$gpu"

if [[ $mode == dry-run ]]; then
  current=$(cat "$stamp" 2>/dev/null || echo none)
  echo "setup.sh dry run: nothing is installed"
  echo "venv: $venv"
  echo "gpu: $gpu (driver CUDA $driver_cuda)"
  echo "torch line: $line"
  echo "torch: pip install ${torch_args[*]}"
  echo "deepspeed: DS_BUILD_OPS=$DS_BUILD_OPS DS_IGNORE_CUDA_DETECTION=$DS_IGNORE_CUDA_DETECTION (no ops compiled, no nvcc needed)"
  echo "then: install -c $venv/constraints.txt --no-build-isolation -e .[test,geo]"
  ((gpu)) && [[ $line != cpu ]] && echo "check: torch.cuda.is_available() must be True after installing torch"
  echo "stamp: $want"
  if [[ $current == "$want" ]]; then echo "action: none (stamp matches)"; else echo "action: install (stamp: $current)"; fi
  exit 0
fi
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -d $venv ]] || "$PY" -m venv "$venv"
# Machines whose pip config names absent local indexes warn once per package: keep the log readable.
pip() { "$venv/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if command -v uv >/dev/null 2>&1 || pip install -q uv; then
  uv=$(command -v uv || echo "$venv/bin/uv")
  # uv reads none of pip's configuration: hand it the local wheel folders pip is told about.
  links=()
  for d in $("$venv/bin/pip" config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
    [[ -d $d ]] && links+=(--find-links "$d")
  done
  # --compile-bytecode: pip writes .pyc files at install, uv does not; without them every Ray
  # worker process compiles ray, mlflow, ... from source again (all of them, where
  # PYTHONDONTWRITEBYTECODE is set), which doubled their start-up here.
  install() { "$uv" pip install -q --compile-bytecode --python "$venv/bin/python" "${links[@]}" "$@"; }
else
  install() { pip install -q "$@"; }
fi
pip install -q -U pip setuptools wheel
# torch through pip: it takes the machine's local CPU wheel where its config names one.
pip install -q "${torch_args[@]}"
if [[ $line != cpu ]] && ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup.sh: torch ${torch_args[0]#torch==} sees no GPU (driver CUDA $driver_cuda); check the driver or set ORBITGEN_TORCH_CUDA" >&2
  exit 1
fi
# Keep whatever torch was chosen: later resolutions must not swap it for another build.
echo "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" > "$venv/constraints.txt"
# deepspeed ships as an sdist that imports torch while building, hence --no-build-isolation.
install -c "$venv/constraints.txt" --no-build-isolation -e ".[test,geo]"
echo "$want" > "$stamp"
echo "orbitgen set up in ./$venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "· CUDA", torch.version.cuda, "· GPU", torch.cuda.is_available())'))"
