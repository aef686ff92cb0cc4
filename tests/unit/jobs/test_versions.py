"""One registered version by number or alias (jobs/tracking/versions.py), shared by eval,
generate, show and promote: found in a local store, and errors that name what exists."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError
from jobs.tracking.versions import model_version, version_of_ref


def test_version_refs_resolve_in_a_local_store(tmp_path):
    """A sqlite store gives version numbers as ints, a server as strings: both resolve."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri()))
    client.create_registered_model("gen")
    for _ in range(2):
        client.create_model_version("gen", f"runs:/{run.info.run_id}/generator", run.info.run_id)
    client.set_registered_model_alias("gen", "champion", "1")
    v = version_of_ref(client, "models:/gen/2")
    assert (v.name, str(v.version), v.run_id) == ("gen", "2", run.info.run_id)
    assert str(version_of_ref(client, "models:/gen@champion").version) == "1"
    with pytest.raises(UserError, match="'gen' has no version 3; versions: 1, 2; aliases: champion=v1"):
        version_of_ref(client, "models:/gen/3")
    with pytest.raises(UserError, match="'gen' has no alias 'best'; aliases: champion=v1"):
        model_version(client, "gen", alias="best")
    with pytest.raises(UserError, match="no registered model named 'nope'; registered: gen"):
        model_version(client, "nope", number="1")
    with pytest.raises(UserError, match="neither models:/NAME@ALIAS"):
        version_of_ref(client, "models:/gen")
