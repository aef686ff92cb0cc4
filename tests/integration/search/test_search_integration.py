"""The search against the real servers (S3 storage, MLflow tracking server) and a killed driver."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.run import run_search
from search.tracking import TAG_PARENT, TAG_TRIAL, show_search

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
CANDIDATES = ["HorizontalFlip", "VerticalFlip", "Rotate", "RandomAffine", "Invert", "Translation_x", "Zoom_out"]


def test_search_on_s3_and_mlflow_server(ray_local, mlflow_server, tmp_path):
    cfg = {"k": 2, "candidates": CANDIDATES[:5], "repeats": 2, "max_images": 128}
    result = run_search("builtin:craters?count=128&seed=0", channels=1, resolution=32, config=cfg,
                        tracking_uri=mlflow_server.url, experiment="search-it", name="it-s3",
                        storage="s3://orbitgen/searches/it-s3", progress=None)
    client = MlflowClient(mlflow_server.url)
    children = client.search_runs([result.experiment_id], f"tags.`{TAG_PARENT}` = '{result.parent_run_id}'")
    assert sorted(c.data.tags[TAG_TRIAL] for c in children) == sorted(cfg["candidates"])
    arts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"ranking.csv", "subsets.csv", "fid_bar.png", "contact_sheet.png"} <= arts
    assert "Rotate" in show_search(result.parent_run_id, mlflow_server.url)
    from data_shards.storage import filesystem
    fs, path = filesystem("s3://orbitgen/searches/it-s3")
    assert fs.exists(path + "/stage1/Rotate.npz") and fs.exists(path + "/ranking.csv")


DRIVER = """
import os, sys
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0"); os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
ray.init(address="local", num_cpus=2, object_store_memory=300_000_000, include_dashboard=False,
         _temp_dir=sys.argv[2])
from search.run import run_search
run_search("builtin:craters?count=1536&seed=0", channels=1, resolution=64,
           config={"k": 2, "candidates": %r, "repeats": 3, "concurrency": 1},
           tracking_uri="sqlite:///" + sys.argv[1] + "/mlflow.db", experiment="kill", name="killed",
           storage=sys.argv[1] + "/killed", progress=print)
"""


def test_killed_driver_resumes_without_rerunning_finished_trials(ray_local, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER % (CANDIDATES,))
    marks = tmp_path / "killed" / "stage1"
    log = open(tmp_path / "driver.log", "wb")
    ray_tmp = tempfile.mkdtemp(prefix="rk")   # short: Ray's socket paths must stay under 108 bytes
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), ray_tmp],
                            cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(marks.glob("*.json"))) < 2 and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the driver and the Ray it started: one process group
        proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    finished = {p.stem: p.stat().st_mtime_ns for p in marks.glob("*.json")}
    assert 2 <= len(finished) < len(CANDIDATES), \
        "kill the driver while trials are still left; driver log:\n" + (tmp_path / "driver.log").read_text()[-3000:]

    result = run_search("builtin:craters?count=1536&seed=0", channels=1, resolution=64,
                        config={"k": 2, "candidates": CANDIDATES, "repeats": 3, "concurrency": 1},
                        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="kill", name="killed",
                        storage=str(tmp_path / "killed"), resume=True, progress=None)
    assert set(finished) <= set(result.stage1_reused)
    assert not set(finished) & set(result.stage1_ran)
    assert {p.stem: p.stat().st_mtime_ns for p in marks.glob("*.json") if p.stem in finished} == finished
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = client.search_runs([result.experiment_id], "tags.`orbitgen.kind` = 'search'")
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    children = client.search_runs([result.experiment_id], f"tags.`{TAG_PARENT}` = '{result.parent_run_id}'")
    assert sorted(c.data.tags[TAG_TRIAL] for c in children) == sorted(CANDIDATES)
    assert all("fid" in c.data.metrics for c in children)
