"""What a training's workers are handed carries no credential: Ray shows the loop config (its Train
state API and dashboard print it as text), so the workers take credentials from their own node."""
from __future__ import annotations

from ray.train.v2._internal.state.schema import _to_json_serializable_value

from data_shards.environ import environ_set
from jobs.runtime.env import forwarded_env
from jobs.train.config import WorkerConfig

KEY, SECRET, TOKEN = "AKIAWORKERSECRET7Q2Z", "worker-secret-never-shown-9f41", "mlflow-token-never-shown-3b8e"
URI = "http://trainer:uri-password-51ac@mlflow.example:5000"


def test_forwarded_variables_leave_every_credential_out():
    with environ_set({"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_TOKEN": TOKEN,
                      "MLFLOW_TRACKING_URI": URI, "AWS_ENDPOINT_URL": "http://s3.example:9000",
                      "ORBITGEN_STORAGE": "s3://bucket/orbitgen"}):
        env = forwarded_env()
    # (The session's S3 server may have set other non-secret variables too: those travel as well.)
    assert env["AWS_ENDPOINT_URL"] == "http://s3.example:9000" and env["ORBITGEN_STORAGE"] == "s3://bucket/orbitgen"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"} & set(env)
    assert not [v for v in env.values() if v in (KEY, SECRET, TOKEN, URI)]


def test_the_loop_config_as_ray_shows_it_holds_no_secret():
    cfg = WorkerConfig(spec={"family": "dcgan", "tracking": {"uri": URI}}, run_id="abc123", tracking_uri=URI,
                       data_url=f"s3://{KEY}:{SECRET}@bucket/shards", env={"AWS_ENDPOINT_URL": "http://s3:9000"})
    shown = str(_to_json_serializable_value(cfg.as_loop_config()))   # what Ray's Train state records
    assert "abc123" in shown and "dcgan" in shown
    assert not [s for s in (KEY, SECRET, "uri-password-51ac") if s in shown], shown
