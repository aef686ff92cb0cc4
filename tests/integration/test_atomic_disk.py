"""Nothing half-written on a real disk that fills up or refuses writes: `data build` and the
run-info file, each run in its own mount namespace over a small private tmpfs (as root, like
tests/ray_nodes.py `own_disk`). The scenario runs inside the namespace and prints what it saw,
since the tmpfs goes with it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare (a private tmpfs)")

REPO = Path(__file__).resolve().parents[2]

# Runs inside the namespace: the tree of DISK before, the action, the tree after, as JSON.
SCENARIO = r'''
import json, os, sys
disk, action = sys.argv[1], sys.argv[2]

def tree():
    out = {}
    for d, dirs, files in os.walk(disk):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), disk) + "/"] = ""
        for n in files:
            out[os.path.relpath(os.path.join(d, n), disk)] = open(os.path.join(d, n), "rb").read().hex()
    return out

before, error = tree(), None
try:
    if action == "build":
        from data_shards.build import build
        build(sys.argv[3], sys.argv[4], layout="folder", resolution=64, shard_size=20, progress=False)
    elif action == "run-info":
        from jobs.train.resume import read_run_info, write_run_info
        info = {"mlflow_run_id": "r" * 32, "tracking_uri": "http://t", "padding": "xy " * int(sys.argv[3])}
        write_run_info(disk, "run1", info)
    elif action == "spill":
        from jobs.tracking.buffered import RecordBuffer
        class Away:   # a tracking server nobody answers for
            def log_batch(self, *a, **kw):
                raise ConnectionRefusedError(111, "Connection refused")
        buf = RecordBuffer(Away(), "run", spill="file://" + disk + "/pending")
        buf.put("params", {"small": "1"})
        buf.put("params", {"grid": "xy " * int(sys.argv[3])})
        buf.close(timeout=3)
except Exception as e:
    error = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}
after = {"error": error, "before": before, "after": tree()}
if action == "run-info":
    from jobs.train.resume import read_run_info
    after["run_id"] = read_run_info(disk, "run1")["mlflow_run_id"]
if action == "spill":
    from jobs.tracking.buffered import Record
    folder = os.path.join(disk, "pending")
    after["pending"] = {n: Record.from_json(n, open(os.path.join(folder, n), "rb").read()).data
                        for n in sorted(os.listdir(folder))}
print("RESULT " + json.dumps(after))
'''


def in_namespace(tmp_path: Path, mounts: str, *args: str) -> dict:
    """Run SCENARIO on DISK (tmp_path/disk) after `mounts` (sh, inside a private mount namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    command = f"{mounts} && exec \"$@\""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", command, "sh",
                           sys.executable, "-c", SCENARIO, str(disk), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory) -> Path:
    """200 noise images (they do not compress): about 2.5 MB of shards, more than the 2 MB disk."""
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


def test_a_disk_that_fills_during_data_build_is_left_as_it_was(tmp_path, noise_images):
    disk = tmp_path / "disk"
    setup = (f"mount -t tmpfs -o size=2m tmpfs {disk} && mkdir -p {disk}/sets/new && "
             f"echo kept > {disk}/sets/new/README")
    out = in_namespace(tmp_path, setup, "build", str(noise_images), str(disk / "sets" / "new"))
    assert out["error"] is not None and out["error"]["errno"] == 28, out["error"]
    assert "\n" not in out["error"]["message"] and str(disk / "sets" / "new") in out["error"]["message"]
    assert out["after"] == out["before"] and "sets/new/README" in out["after"]


def test_a_destination_that_refuses_writes_is_left_as_it_was(tmp_path, noise_images):
    disk = tmp_path / "disk"
    setup = (f"mount -t tmpfs -o size=8m tmpfs {disk} && mkdir -p {disk}/colleague && "
             f"echo theirs > {disk}/colleague/notes && mount --bind {disk}/colleague {disk}/colleague && "
             f"mount -o remount,bind,ro {disk}/colleague")
    out = in_namespace(tmp_path, setup, "build", str(noise_images), str(disk / "colleague" / "set"))
    assert out["error"] is not None and out["error"]["errno"] == 30, out["error"]   # EROFS
    assert "\n" not in out["error"]["message"] and str(disk / "colleague" / "set") in out["error"]["message"]
    assert out["after"] == out["before"]


def test_run_info_rewritten_on_a_full_disk_keeps_the_old_file_whole(tmp_path):
    """The old writer opened the file in place: the disk filling up mid-write left half a JSON,
    and `--resume` failed on it."""
    disk = tmp_path / "disk"
    old = json.dumps({"mlflow_run_id": "o" * 32, "tracking_uri": "http://t"})
    setup = (f"mount -t tmpfs -o size=1m tmpfs {disk} && mkdir {disk}/run1 && "
             f"printf '%s' '{old}' > {disk}/run1/orbitgen-run.json")
    out = in_namespace(tmp_path, setup, "run-info", str(2**20))   # 3 MB of info on a 1 MB disk
    assert out["error"] is not None and out["error"]["errno"] == 28, out["error"]
    assert out["after"] == out["before"] and out["run_id"] == "o" * 32


def test_tracking_records_kept_on_a_full_disk_are_whole_files(tmp_path):
    """The old buffer wrote its files in place: a full disk left a record cut short, and the
    driver's replay failed on it after training and on every --resume."""
    disk = tmp_path / "disk"
    out = in_namespace(tmp_path, f"mount -t tmpfs -o size=1m tmpfs {disk}", "spill", str(2**19))   # 1.5 MB
    assert out["error"] is None, out["error"]
    assert list(out["pending"].values()) == [{"small": "1"}]   # whole; the grid did not fit and is not there
