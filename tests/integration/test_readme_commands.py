"""Every command in the README's ```bash blocks runs and exits 0, as a new user would type it,
unless it is listed in SKIPPED with the reason.

They run in README order, in a fresh folder (the repository's `jobs/` linked in, so the README's
relative spec paths work), with the `orbitgen` of .venv and no MLFLOW_TRACKING_URI: the local
store under ./orbitgen-work, as on a first day. To stay within CI's budget (about two minutes on
2 cores) the commands change in the ways SHRUNK lists, and nothing else: trainings run at the tiny
size, sample counts are small, `s3://bucket/...` is a local folder (no object store is reached),
and the one version trained here stands in for "v2". The commands share the test session's Ray
(RAY_ADDRESS), so each does not start its own.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BUDGET_S = 200          # the whole README, on 2 cores
COMMAND_S = 150         # any one command

# Commands (by how they start) that need a cluster, a GPU, the network or a long training, or
# stand for something the reader fills in.
SKIPPED = {
    "bash infra/setup.sh": "installs packages from the network and runs the quickstart / the whole suite (minutes)",
    "orbitgen train jobs/specs/pix2pix_maps.yaml": "a 256² pix2pix training on DeepSpeed: minutes "
                                                   "(tests/unit/jobs/test_engines.py runs DeepSpeed)",
    "orbitgen train jobs/specs/quickstart.yaml --resume": "needs a stopped run; quickstart-1a2b3c4d stands for one "
                                                          "(tests/integration/test_resume.py)",
    "orbitgen train jobs/specs/quickstart.yaml --set train.steps=300": "a second training would double this test's "
                                                                       "time; the version the first one registered "
                                                                       "stands in for v2",
    "orbitgen eval models:/quickstart-dcgan/2": "v2 would be the one version trained here, which the `eval` "
                                                "above already evaluates (a second run only costs time)",
    "orbitgen models generate models:/quickstart-dcgan@champion --n 5000 --out s3://": "writes to an object store; "
                                                                                     "the same command with a "
                                                                                     "local --out runs",
    "orbitgen models rollback": "needs an earlier champion, which one tiny version has not "
                                "(tests/unit/jobs/test_registry.py rolls back)",
    "orbitgen jobs ": "needs a Ray cluster's Jobs API (tests/integration/test_jobs_submit.py)",
    "orbitgen doctor jobs/specs/scbgan_rosetta.yaml": "checks a GPU cluster and backbone weight files the reader "
                                                      "provides: it reports them missing here, by design",
    "orbitgen search mineaug": "a search of the whole pool takes over 30 s on 2 cores, past this test's budget "
                               "(tests/integration/test_search_command.py runs one)",
    "orbitgen train orbitgen-work/search/<name>": "the path a search printed (placeholder)",
    "orbitgen search show RUN_ID": "RUN_ID is a placeholder for a search's run",
    "optuna-dashboard ": "a web server that runs until stopped, on a placeholder path (<workdir>, <name>)",
    "export ": "sets variables for a cluster's storage and tracking server",
    "ray up": "starts an AWS cluster",
    "ray dashboard": "an SSH tunnel to a cluster",
    "kubectl ": "needs a Kubernetes cluster",
}

# (pattern, replacement): what is shrunk, and why.
SHRUNK = [
    (r"s3://bucket/", "{tmp}/bucket/"),                        # no object store: a local folder
    (r"--num-samples \d+", "--num-samples 64"),                 # seconds, not minutes
    (r"--n 5000", "--n 16"),
    (r"--workers 4", "--workers 2"),                            # 2 cores
    (r"models:/quickstart-dcgan/2", "models:/quickstart-dcgan/1"),   # the one version trained here
    (r"--version 2", "--version 1"),
]
TINY_TRAIN = " ".join(f"--set {shlex.quote(s)}" for s in tiny_sets("quickstart", "scaling.num_workers=1"))


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks: comments dropped, continuation lines joined."""
    commands, block, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block or not line.strip() or line.lstrip().startswith("#"):
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        commands.append(re.sub(r"\s+#.*$", "", line).strip())
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def shrunk(command: str, tmp: Path) -> str:
    for pattern, replacement in SHRUNK:
        command = re.sub(pattern, replacement.format(tmp=tmp), command)
    if command.startswith("orbitgen train jobs/specs/quickstart.yaml"):
        command += " " + TINY_TRAIN
    return command


def user_data(tmp: Path) -> None:
    """What the reader has before `data build`: ./my_images (a folder of images) and maps/ (pairs side by side)."""
    rng = np.random.default_rng(0)
    for folder, size in (("my_images", (256, 256)), ("maps", (256, 512))):
        (tmp / folder).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / folder / f"tile_{i}.png")


def test_the_readme_commands_run(tmp_path, ray_local):
    import ray

    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    user_data(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ORBITGEN_STORAGE")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    commands = readme_commands()
    assert len(commands) > 20 and any(c.startswith("orbitgen eval") for c in commands)
    ran, skipped, failed = [], [], []
    started = time.monotonic()
    for command in commands:
        why = skip_reason(command)
        if why:
            skipped.append((command, why))
            continue
        run = shrunk(command, tmp_path)
        if any(run == earlier for earlier, _ in ran):
            skipped.append((command, "the same command ran above"))
            continue
        t = time.monotonic()
        done = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=COMMAND_S)
        ran.append((run, round(time.monotonic() - t)))
        if done.returncode != 0:
            failed.append(f"{run}\n  exit {done.returncode}\n  {done.stdout[-1500:]}\n  {done.stderr[-1500:]}")
    print("\n".join(f"ran {s:>3} s  {c}" for c, s in ran))
    print("\n".join(f"skipped  {c}  ({why})" for c, why in skipped))
    assert not failed, "\n\n".join(failed)
    assert len(ran) >= 9, ran
    assert time.monotonic() - started < BUDGET_S, ran
