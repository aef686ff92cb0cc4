"""The links `train`, `eval` and `promote` print: the tracking server's pages (password masked) for
an http(s) tracking URI, the `mlflow ui` command that serves them for a local store."""
from __future__ import annotations

from jobs.tracking.runs import experiment_link, is_http, run_link, ui_command, version_link

SERVER = "https://ci:hunter22@mlflow.example.org:5000/"


def test_server_pages_follow_mlflows_routes_with_the_password_masked():
    assert run_link(SERVER, "3", "abc") == "https://ci:***@mlflow.example.org:5000/#/experiments/3/runs/abc"
    assert experiment_link("http://127.0.0.1:5000", "0") == "http://127.0.0.1:5000/#/experiments/0"
    assert version_link("http://h", "quickstart-dcgan", "7") == "http://h/#/models/quickstart-dcgan/versions/7"
    assert version_link("http://h", "a b/c", "1") == "http://h/#/models/a%20b%2Fc/versions/1"
    assert "hunter22" not in version_link(SERVER, "m", "1")


def test_a_local_store_gets_the_ui_command_instead():
    for uri in ("sqlite:////tmp/w/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        assert not is_http(uri)
        assert run_link(uri, "1", "r") == f"open it with: mlflow ui --backend-store-uri {uri} --port 5000"
        assert version_link(uri, "m", "2") == experiment_link(uri, "1") == f"open it with: {ui_command(uri)}"
    assert is_http("http://h") and is_http(SERVER)
