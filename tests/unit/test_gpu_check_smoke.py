"""benchmarks/gpu_check.sh --smoke: the GPU check's code runs on the CPU and prints every row.

The check is the first thing to run when a GPU is lent; this keeps it from rotting
between loans. It runs the prepared command itself, as a person would. DeepSpeed's first
`initialize` on a machine JIT-compiles a comm op (≈25 s once, cached under .cache/torch_extensions).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROWS = ("stylegan2_ddp", "stylegan2_zero1", "diffusion_img_s", "diffusion_tflops", "diffusion_mfu", "data",
        "randconv", "inception")


def test_gpu_check_smoke_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--peak-tflops", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
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
    table = run.stdout
    assert "| measure | value | unit | notes | s |" in table
    for r in rows.values():
        assert f"| {r['label']} | {r['value']:.4g} | {r['unit']} |" in table
