"""The Ray that orbitgen starts on this machine keeps other hosts out: either every port its
processes listen on is bound to loopback, or it runs with Ray's token authentication and a client
without the token is refused. orbitgen never turns authentication off (jobs/runtime/ray_session.py).

Run in subprocesses with their own HOME (where Ray keeps its token) and without RAY_AUTH_MODE,
which the test session itself sets for its own clusters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, re
from pathlib import Path
import ray
from jobs.runtime.ray_session import ensure_ray
from ray._raylet import AuthenticationMode, get_authentication_mode

ensure_ray(num_cpus=1)
session = ray._private.worker._global_node.get_session_dir_path()

def inodes(pid):
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if m:
            out.add(m.group(1))
    return out

ours = set()
for entry in Path("/proc").iterdir():
    if entry.name.isdigit():
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            if session in cmd or os.path.basename(session) in cmd or int(entry.name) == os.getpid():
                ours |= inodes(entry.name)
        except OSError:
            pass
listening = []
for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
    for line in Path(table).read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in ours:   # LISTEN, one of the Ray processes' sockets
            listening.append(f[1].split(":")[0])
print(json.dumps({"token": get_authentication_mode() == AuthenticationMode.TOKEN,
                  "gcs": ray.get_runtime_context().gcs_address, "listening": listening}))
"""

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}   # 127.0.0.1 and ::1 as /proc/net writes them


def env_with_home(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def test_the_local_ray_is_closed_to_other_hosts(tmp_path):
    # The probe keeps its Ray up until told to stop on stdin, then shuts it down itself.
    probe = subprocess.Popen([sys.executable, "-c", PROBE + "\nimport sys; sys.stdout.flush(); sys.stdin.readline()\n"
                              "ray.shutdown()"], env=env_with_home(tmp_path / "owner"), cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = json.loads(probe.stdout.readline() or "{}")
        assert seen.get("listening"), probe.stderr.read() if probe.poll() is not None else seen
        open_ports = [a for a in seen["listening"] if a not in LOOPBACK]
        if not open_ports:
            return   # every port on loopback: nothing else to check
        assert seen["token"], f"Ray listens on {len(open_ports)} non-loopback addresses without authentication"
        stranger = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={seen['gcs']!r}, log_to_driver=False); print('JOINED')"],
            env=env_with_home(tmp_path / "stranger"), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert stranger.returncode != 0 and "JOINED" not in stranger.stdout
        assert "token" in stranger.stderr.lower()
    finally:
        probe.stdin.write("stop\n")
        probe.stdin.flush()
        try:
            probe.wait(60)
        except subprocess.TimeoutExpired:
            probe.kill()
