#!/usr/bin/env bash
# Creates ./.venv with orbitgen and its dependencies (idempotent: a second run with an
# unchanged pyproject.toml returns at once). CPU torch unless nvidia-smi finds a GPU.
# uv installs (parallel downloads and unpacking, ~3x pip here); pip where uv cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.orbitgen-setup
want=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then exit 0; fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -d .venv ]] || "$PY" -m venv .venv
# Machines whose pip config names absent local indexes warn once per package: keep the log readable.
pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if command -v uv >/dev/null 2>&1 || pip install -q uv; then
  uv=$(command -v uv || echo .venv/bin/uv)
  # uv reads none of pip's configuration: hand it the local wheel folders pip is told about.
  links=()
  for d in $(.venv/bin/pip config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
    [[ -d $d ]] && links+=(--find-links "$d")
  done
  # --compile-bytecode: pip writes .pyc files at install, uv does not; without them every Ray
  # worker process compiles ray, mlflow, ... from source again (all of them, where
  # PYTHONDONTWRITEBYTECODE is set), which doubled their start-up here.
  install() { "$uv" pip install -q --compile-bytecode --python .venv/bin/python "${links[@]}" "$@"; }
else
  install() { pip install -q "$@"; }
fi
pip install -q -U pip setuptools wheel
# torch through pip: it takes the machine's local CPU wheel where its config names one.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q torch                      # the registry's default build is the CUDA one
else
  pip install -q "torch==${ORBITGEN_CPU_TORCH:-2.13.0}" numpy  # the +cpu wheel where pip's find-links has it
fi
# Keep whatever torch was chosen: later resolutions must not swap it for another build.
echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')" > .venv/constraints.txt
# deepspeed ships as an sdist that imports torch while building, hence --no-build-isolation.
install -c .venv/constraints.txt --no-build-isolation -e ".[test]"
echo "$want" > $stamp
echo "orbitgen set up in ./.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
