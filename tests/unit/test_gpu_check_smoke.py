"""benchmarks/gpu_check.sh --smoke: the GPU check's code runs on the CPU and prints every row.

The check is the first thing to run when a GPU is lent; this keeps it from rotting
between loans. It runs the prepared command itself, as a person would, with the interpreter
running the tests (ORBITGEN_PYTHON: the set-up is CI's own `bash infra/setup.sh`). DeepSpeed's
first `initialize` on a machine JIT-compiles a comm op (≈25 s once, cached under .cache/torch_extensions).
The other tests: without CUDA the check fails in one line; it bootstraps through infra/setup.sh and
never falls back to the system's python3; the peak table is keyed by exact device names; the FLOP
counter counts through a double backward (R1, path length).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
ROWS = ("stylegan2_ddp", "stylegan2_zero1", "stylegan2_anchor", "diffusion_img_s", "diffusion_tflops",
        "diffusion_mfu", "data", "randconv", "inception")
TRAINING_ROWS = ("stylegan2_ddp", "stylegan2_zero1", "stylegan2_anchor", "diffusion_img_s", "diffusion_tflops",
                 "diffusion_mfu", "data")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module   # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def test_gpu_check_smoke_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TMPDIR": str(tmp_path), "ORBITGEN_PYTHON": sys.executable}
    run = subprocess.run(["bash", str(GPU_CHECK), "--smoke", "--peak-tflops", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert tuple(rows) == ROWS
    failed = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert not failed, failed
    bad = {k: r["value"] for k, r in rows.items() if not (isinstance(r["value"], float) and math.isfinite(r["value"])
                                                          and r["value"] > 0)}
    assert not bad, bad
    assert result["smoke"] and result["torch"] and result["card"]
    assert "driver" in result and result["setup_seconds"] is None   # ORBITGEN_PYTHON: no set-up run
    # Every training row records how it ran; smoke runs at batch 4, bf16, and counts no host syncs (CPU).
    for key in TRAINING_ROWS:
        r = rows[key]
        assert (r["batch_per_gpu"], r["bf16"], r["channels_last"], r["compile"]) == (4, True, False, False), key
        assert r["syncs_per_step"] is None, key
    for key in ("stylegan2_ddp", "stylegan2_anchor"):
        assert "GFLOP/img" in rows[key]["note"] and "ADA p₀ 0.2" in rows[key]["note"], rows[key]["note"]
    assert "16² × 3ch" in rows["stylegan2_anchor"]["note"] and "16² × 1ch" in rows["stylegan2_ddp"]["note"]
    table = run.stdout
    assert "| measure | value | unit | batch/GPU | bf16 | channels_last | compile | host syncs/step | notes | s |" \
        in table
    assert "set-up (infra/setup.sh, outside the check's budget)" in table
    for r in rows.values():
        assert f"| {r['label']} | {r['value']:.4g} | {r['unit']} |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_check_fails_in_one_line(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "ORBITGEN_PYTHON": sys.executable}
    run = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), run.stderr


def test_bootstraps_through_setup_and_never_uses_system_python(tmp_path):
    # A python3 first on the PATH that leaves a mark: the check must not run it. The set-up runs in its
    # dry-run mode for a venv that does not exist, so no Python is there afterwards: the check says so.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "system-python-ran"
    for name in ("python3", "python"):
        fake = bin_dir / name
        fake.write_text(f"#!/bin/sh\ntouch {mark}\nexit 0\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ORBITGEN_PYTHON"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", ORBITGEN_VENV=str(tmp_path / "venv"), ORBITGEN_SETUP_DRY_RUN="1")
    run = subprocess.run(["bash", str(GPU_CHECK), "--smoke"], capture_output=True, text=True, timeout=60, env=env)
    assert "setup.sh dry run" in run.stdout, run.stdout + run.stderr   # infra/setup.sh ran first
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == f"gpu_check: no Python at {tmp_path / 'venv'}/bin/python after " \
                                                  "set-up (run bash infra/setup.sh)"
    assert not mark.exists()


def test_peak_table_is_keyed_by_exact_device_names(gpu_check):
    # NVIDIA's datasheets give bf16 tensor peaks "with sparsity"; dense is half of that.
    with_sparsity = {"NVIDIA H100 80GB HBM3": 1979, "NVIDIA H100 PCIe": 1513, "NVIDIA H100 NVL": 1671,
                     "NVIDIA H200": 1979, "NVIDIA H200 NVL": 1671, "NVIDIA L4": 242}
    for card, sparse in with_sparsity.items():
        assert gpu_check.peak_for(card)[0] == pytest.approx(sparse / 2, rel=2e-3), card
    assert gpu_check.peak_for("NVIDIA L40S")[0] == 362.05   # its datasheet's dense column
    for card in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert gpu_check.peak_for(card)[0] == 312.0, card
    assert gpu_check.peak_for("NVIDIA H200 NVL")[0] != gpu_check.peak_for("NVIDIA H200")[0]
    # Names not in the table are unknown, never the nearest match.
    for card in ("NVIDIA H200 NVL 2", "NVIDIA H100", "NVIDIA GeForce RTX 4090", "NVIDIA A10G"):
        peak, source = gpu_check.peak_for(card)
        assert peak is None and source.startswith("unknown"), card


def test_flop_count_goes_through_a_double_backward(gpu_check):
    # y = x W^T (batch b, in i, out o): forward 2·b·i·o; backward to W and to x 2·b·i·o each. The gradient
    # penalty then differentiates grad_x again (create_graph), as R1 does: more FLOPs, and no error.
    b, i, o = 8, 32, 16
    lin = torch.nn.Linear(i, o, bias=False)

    def plain():
        x = torch.randn(b, i, requires_grad=True)
        lin(x).sum().backward()

    def penalised():
        x = torch.randn(b, i, requires_grad=True)
        (grad_x,) = torch.autograd.grad(lin(x).square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()

    assert gpu_check.count_flops(plain, 2) == 2 * 3 * 2 * b * i * o
    penalty = gpu_check.count_flops(penalised, 1)
    assert penalty is not None and penalty > 3 * 2 * b * i * o
