"""`orbitgen-run.json` keeps no password of the tracking URI, and `--resume` still finds its run."""
from __future__ import annotations

import pytest

from jobs.train.driver import _resumed_run
from jobs.train.resume import RUN_INFO, ResumeError, write_run_info

PASSWORD = "hunter2-not-at-rest"
URI = f"https://user:{PASSWORD}@mlflow.example.com"


def test_run_info_holds_no_password_and_resume_matches(tmp_path):
    storage = tmp_path.as_uri()
    write_run_info(storage, "r1", {"mlflow_run_id": "abc", "tracking_uri": URI, "experiment": "e", "spec_sha": "s"})
    text = (tmp_path / "r1" / RUN_INFO).read_text()
    assert PASSWORD not in text and "mlflow.example.com" in text
    assert _resumed_run(URI, storage, "r1")["mlflow_run_id"] == "abc"
    with pytest.raises(ResumeError, match="other.example.com") as e:
        _resumed_run(URI.replace("mlflow.", "other."), storage, "r1")
    assert PASSWORD not in str(e.value)
