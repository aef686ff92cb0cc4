"""Ray nodes of one cluster on loopback, for tests that need more than one machine.

Each node is a `ray start --block` in its own process group, with its own temp dir and free
ports, so several nodes (and other test sessions' Ray instances) share this host. A node is
stopped by ending exactly its processes: `ray stop` cannot be scoped and would stop every Ray on
the machine. What the raylet started outside its process group is found by the node's temp dir,
which every Ray process of the node names on its command line or works under.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))
from local_stack import free_port  # noqa: E402

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100_000_000


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """The venv's `python` on the PATH (jobs run the PATH's python), Ray quiet and without auth
    tokens, and no address or store that the test process may have picked up; then `extra`."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", **(extra or {})}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _port_flags(*flags: str) -> list[str]:
    return [arg for flag in flags for arg in (flag, str(free_port()))]


# Every port a node binds, free: the defaults may be held by another Ray on this host, and a node
# whose agent cannot bind never runs a job ("No available agent") or a worker.
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")


@dataclass
class RayNode:
    temp_dir: Path
    proc: subprocess.Popen
    log: Path
    gcs_address: str = ""      # the head's only
    dashboard: str = ""        # the head's only: the Jobs and state API

    def _stragglers(self) -> list[int]:
        """Processes of this node left outside its process group (by temp dir in command line or cwd)."""
        mark, pids = str(self.temp_dir), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if mark in cmdline or cwd.startswith(mark):
                pids.append(int(entry.name))
        return pids

    def stop(self, grace_s: float = 15) -> None:
        """End this node's processes (SIGTERM, then SIGKILL after `grace_s`)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.proc.poll() is None or self._stragglers()):
            time.sleep(0.2)
        for pid in self._stragglers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def own_disk(hidden: list[Path], command: list[str]) -> list[str]:
    """`command` run in its own mount namespace with an empty private tmpfs over each of `hidden`:
    what a separate machine sees of this one's folders (nothing). Needs root, as on CI."""
    mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(d))}" for d in hidden)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]


def _start(args: list[str], temp_dir: Path, env: dict[str, str] | None = None,
           hidden: list[Path] | None = None) -> RayNode:
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = temp_dir / "ray-start.log"
    command = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--temp-dir", str(temp_dir),
               "--node-ip-address", "127.0.0.1", "--object-store-memory", str(OBJECT_STORE_BYTES),
               *args, *_port_flags(*NODE_PORTS)]
    proc = subprocess.Popen(own_disk(hidden, command) if hidden else command,
                            env=_env(env), stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(temp_dir, proc, log)


def start_head(temp_dir: Path, num_cpus: int, resources: dict[str, float], env: dict[str, str] | None = None,
               timeout_s: float = 90) -> RayNode:
    """A head node with the dashboard (Jobs API) on loopback; returns once it accepts jobs. Jobs'
    drivers run on the head and inherit its environment (`env` added)."""
    from ray.job_submission import JobSubmissionClient

    port, dash = free_port(), free_port()
    node = _start(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                   "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                   *_port_flags("--ray-client-server-port")], temp_dir, env)
    node.gcs_address, node.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(node.dashboard).list_jobs()
            return node
        except Exception:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                node.stop()
                raise RuntimeError(f"ray head did not come up: {node.log.read_text()[-3000:]}")
            time.sleep(1)


def start_worker(head: RayNode, temp_dir: Path, num_cpus: int, resources: dict[str, float],
                 timeout_s: float = 60, hidden: list[Path] | None = None) -> tuple[RayNode, str]:
    """A further node joining `head`'s cluster; returns it and its node id once the cluster lists it alive.
    `hidden`: folders of this machine the node does not see (`own_disk`); its temp dir must lie outside them."""
    node = _start(["--address", head.gcs_address, "--num-cpus", str(num_cpus), "--resources", json.dumps(resources)],
                  temp_dir, hidden=hidden)
    name = next(iter(resources))
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in alive_nodes(head) if name in n.resources_total]
        if alive:
            return node, alive[0].node_id
        if node.proc.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"ray node did not join: {node.log.read_text()[-3000:]}")
        time.sleep(0.5)


def alive_nodes(head: RayNode) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=head.dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                      raise_on_missing_output=False)
