"""Fixtures that start the real parts on loopback: an S3-compatible server, an MLflow server, Ray.

Integration tests (tests/integration/, marked `integration`) use them; unit tests need none of them.
Layout: unit/ (data, models, metrics, jobs; seconds), families/ (every family against the
contract), integration/ (real Ray, MLflow and S3; minutes). Shared helpers sit beside this file.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
import local_stack  # noqa: E402

from data_shards.environ import environ_set  # noqa: E402

# Keep Ray, MLflow and torch extensions inside a temp dir and quiet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint with bucket `orbitgen`; the standard AWS variables point at it."""
    svc = local_stack.start_s3(tmp_path_factory.mktemp("s3"))
    with environ_set(local_stack.s3_env(svc.url)):
        local_stack.create_bucket(svc.url, "orbitgen")
        yield svc
    svc.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` (sqlite backend, artifacts in s3://orbitgen/mlflow)."""
    svc = local_stack.start_mlflow(tmp_path_factory.mktemp("mlflow"), "s3://orbitgen/mlflow", s3_server.url)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """A local Ray instance for the whole session (starting one costs seconds). Started after the S3
    server's variables are set: its workers take their credentials from their own environment, as a
    cluster's nodes do (jobs/runtime/env.py forwards none)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=300_000_000,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture
def pil_decodes(monkeypatch):
    """The sizes of the images PIL decodes pixels of (ImageFile.load) while the test runs; the
    decodes still happen. An image refused by its header never shows here."""
    from PIL import ImageFile

    calls = []
    real = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.fixture(scope="session")
def process_group():
    """DeepSpeed needs a process group and the launcher's variables, even alone: one gloo rank.
    One for the whole session: DeepSpeed keeps the group it first saw in module globals, so a
    group destroyed and made again between test modules breaks every later engine."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # DeepSpeed JIT-compiles a comm op once per machine: keep it in the repo's ignored cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with environ_set(env):
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """The folder decides the layer: everything under tests/integration/ is `integration`."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
