"""Start the local stand-ins of the team's services: an S3-compatible server and an MLflow server.

Used by the tests (ephemeral ports, temporary folders) and by people (`python infra/local_stack.py`
starts both on fixed ports and prints the environment to export). Both are real servers on
loopback: moto's S3 HTTP endpoint (no MinIO package exists on this registry) and `mlflow server`
with a sqlite backend storing artifacts in a bucket of that S3 server.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{url} not up after {timeout}s; log: {log}")


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


S3_ENV_DEFAULTS = {"AWS_ACCESS_KEY_ID": "orbitgen", "AWS_SECRET_ACCESS_KEY": "orbitgen-secret",
                   "AWS_DEFAULT_REGION": "us-east-1"}


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard variables every S3 client here (s3fs, boto3, MLflow, pyarrow) reads."""
    return {**S3_ENV_DEFAULTS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def start_s3(workdir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    log = workdir / "s3.log"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/moto-api/", proc, 30, log)
    return Service(url, proc, log)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV_DEFAULTS.items()
                                                  if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=bucket)


def start_mlflow(workdir: Path, artifacts: str, s3_endpoint: str | None, port: int | None = None) -> Service:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "mlflow.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3_endpoint:
        env.update(s3_env(s3_endpoint))
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health", proc, 90, log)
    return Service(url, proc, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="orbitgen-work/local-stack", help="where the servers keep their state")
    ap.add_argument("--s3-port", type=int, default=9000)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--bucket", default="orbitgen", help="bucket for shards, runs and MLflow artifacts")
    args = ap.parse_args()
    d = Path(args.dir).absolute()
    s3 = start_s3(d, args.s3_port)
    os.environ.update(s3_env(s3.url))
    create_bucket(s3.url, args.bucket)
    ml = start_mlflow(d, f"s3://{args.bucket}/mlflow", s3.url, args.mlflow_port)
    print("S3 (moto) and MLflow are up. In another shell:")
    for k, v in {**s3_env(s3.url), "MLFLOW_TRACKING_URI": ml.url}.items():
        print(f"  export {k}={v}")
    print(f"Shards/runs go to s3://{args.bucket}/...; Ctrl-C stops both (moto keeps data in memory).")
    try:
        while s3.proc.poll() is None and ml.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        ml.stop()
        s3.stop()


if __name__ == "__main__":
    main()
