"""What `orbitgen train` prints: orbitgen's lines and one progress bar; Ray's and
MLflow's internal lines in a log file under the work dir, the workers' output in Ray's logs,
linked beside it. `--verbose` brings them all back to the console. Run as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = 6
RAY_AND_MLFLOW = ("TrainController", "RayTrainWorker", "core_worker", "Reporting training result",
                  "Started a local Ray instance", "Creating initial MLflow database", "Successfully registered model")


def train(workdir: Path, *flags: str) -> str:
    sets = [f"workdir={workdir}", "data.train=builtin:craters?count=64&seed=0", "data.resolution=16",
            "data.shuffle_buffer=16", "data.loader_workers=0", "model.nz=8", "model.ngf=8", "model.ndf=8",
            "train.batch=8", f"train.steps={STEPS}", "train.log_every=2", f"checkpoint.every_steps={STEPS}",
            "eval.num_samples=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ORBITGEN_VERBOSE")}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "jobs/specs/quickstart.yaml", *flags,
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def test_quiet_by_default_with_a_progress_bar_and_a_log_file(tmp_path):
    out = train(tmp_path)
    assert not [line for line in out.splitlines() if any(s in line for s in RAY_AND_MLFLOW)], out[-3000:]
    assert f"{STEPS}/{STEPS}" in out and "img/s" in out and "loss_D" in out   # the bar, at its end
    log = Path(re.search(r"logs\s+(\S+\.log)", out).group(1))
    assert log.parent == tmp_path / "logs" and "Creating initial MLflow database" in log.read_text()
    assert (tmp_path / "logs" / "ray").is_dir()   # the workers' console output, in Ray's session logs


def test_verbose_shows_the_workers_and_the_libraries(tmp_path):
    out = train(tmp_path, "--verbose")
    assert "[orbitgen] step 2/" in out           # a worker's own line, forwarded by Ray
    assert "Creating initial MLflow database" in out
    assert not (tmp_path / "logs").exists()
