"""A registration retried after a server error that came after the write registers one version.

The fault is real: the client talks to the real MLflow server through a loopback proxy that
forwards the request creating the model version, lets the server write it, and then answers the
client 503 instead of the server's answer. `log_generator` waits the error out (`retried`) and
tries again; it must find the version it made (by its registration token) instead of making a
second. Calling `log_generator` again for the same run and snapshot (what `train --resume`
does after the server stayed away) finds it too; another snapshot is another version.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.spec import SPECS_DIR, load_spec
from jobs.tracking.buffered import RETRY_ENV
from jobs.tracking.registry import TAG_REGISTRATION, log_generator
from models.snapshot import save_snapshot
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
NAME = "registration-retry"
CREATE_VERSION = "/api/2.0/mlflow/model-versions/create"
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


class FailAfterWrite:
    """A loopback proxy to `target`: requests to `path` are forwarded (the server writes), then the
    client gets 503 instead of the answer, `times` times; everything else passes through."""

    def __init__(self, target: str, path: str, times: int = 1):
        self.target, self.path, self.left, self.failed = urlsplit(target).netloc, path, times, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if self.path.split("?")[0] == proxy.path and proxy.left > 0 and resp.status == 200:
                    proxy.left -= 1
                    proxy.failed += 1
                    status, data = 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}'
                    out = [("Content-Type", "application/json")]
                else:
                    status = resp.status
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                self.send_response(status)
                for k, v in out:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def snapshots(tmp_path):
    """Two tiny untrained DCGAN snapshots (different weights) and the spec beside them."""
    spec = load_spec(SPECS_DIR / "quickstart.yaml", tiny_sets("quickstart", f"workdir={tmp_path / 'work'}"))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    family = spec.make_family()
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"g{seed}" / "generator.pt"
        path.parent.mkdir()
        save_snapshot(path, family, family.build()[family.sampler_role])
        out.append(path)
    return out, spec_file


def test_a_retry_after_a_server_error_after_the_write_registers_one_version(mlflow_server, snapshots, monkeypatch):
    (first, second), spec_file = snapshots
    proxy = FailAfterWrite(mlflow_server.url, CREATE_VERSION)
    monkeypatch.setenv(RETRY_ENV, "60")
    mlflow.set_tracking_uri(proxy.url)
    try:
        mlflow.set_experiment(NAME)
        with mlflow.start_run() as run:
            version = log_generator(first, spec_file, NAME)
            assert proxy.failed == 1                     # the server wrote it, the client heard 503
            assert log_generator(first, spec_file, NAME) == version      # the whole call again
            other = log_generator(second, spec_file, NAME)               # another checkpoint
    finally:
        mlflow.set_tracking_uri(None)
        proxy.close()
    client = MlflowClient(mlflow_server.url)
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{NAME}'")}
    assert sorted(versions) == sorted({version, other}) and version != other
    token = versions[version].tags[TAG_REGISTRATION]
    assert versions[other].tags[TAG_REGISTRATION] != token
    assert client.get_run(run.info.run_id).data.tags[TAG_REGISTRATION] == versions[other].tags[TAG_REGISTRATION]
    # the model logged once for the first snapshot, not once per try
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len([m for m in logged if (m.tags or {}).get(TAG_REGISTRATION) == token]) == 1
