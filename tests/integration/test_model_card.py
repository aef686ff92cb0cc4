"""A registered version's model card: its MLflow description holds every fact of its lineage.

A version is registered the way training does it, against the real MLflow server: a run with the
driver's tags, dataset input, spec.yaml and a sample grid; `log_generator` on a tiny snapshot;
`tag_version` with the registered scores; `promote`. The description the registry then returns
must hold the spec and its hash, the git commit, the data URL (password masked) and fingerprint,
the augmentations and the search run, the evaluation with its protocol, the sample grid's
artifact path and the command that trains it again; `models show NAME/VERSION` prints the same.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.cli import main
from jobs.spec import SPECS_DIR, load_spec
from jobs.runtime.redact import redact
from jobs.tracking import runs
from jobs.tracking.protocol import TAG_RUN_PROTOCOL, EvalProtocol, tag_version
from jobs.tracking.registry import CARD_MAX_CHARS, log_generator, promote
from models.snapshot import save_snapshot
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
NAME = "model-card"
PASSWORD = "card-secret-pw"
DATA_URL = f"http://reader:{PASSWORD}@127.0.0.1:9/shards/craters"
FINGERPRINT = "c0ffee" * 10
GIT = "0123456789abcdef0123456789abcdef01234567"
SEARCH = "5ea4c40000000000000000000000abcd"
PROTOCOL = EvalProtocol(data_fingerprint=FINGERPRINT, split="holdout=0.1", real_seed=7, seed_base=1_000_000,
                        num_samples=64, extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})


@pytest.fixture(scope="module")
def card(mlflow_server, tmp_path_factory):
    """(client, version, run id, spec): one version registered as training registers it."""
    tmp = tmp_path_factory.mktemp("card")
    spec = load_spec(SPECS_DIR / "quickstart.yaml", tiny_sets(
        "quickstart", f"workdir={tmp / 'work'}", f"data.train={DATA_URL}",
        "augment.mineaug=[HorizontalFlip,Rotate]", f"augment.search_run={SEARCH}"))
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(redact(spec.to_yaml()))
    family = spec.make_family()
    torch.manual_seed(0)
    snapshot = tmp / "generator.pt"
    save_snapshot(snapshot, family, family.build()[family.sampler_role])
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        mlflow.set_experiment(NAME)
        with mlflow.start_run() as run:
            mlflow.set_tags({runs.TAG_SPEC: spec.sha(), runs.TAG_GIT: GIT, runs.TAG_DATA: FINGERPRINT,
                             runs.TAG_SEARCH: SEARCH, "orbitgen.git_dirty": "false",
                             TAG_RUN_PROTOCOL: PROTOCOL.to_json()})
            runs.log_dataset(DATA_URL, {"fingerprint": FINGERPRINT, "count": 8})
            mlflow.log_text(spec_file.read_text(), "spec.yaml")
            mlflow.log_image(np.zeros((8, 8, 3), np.uint8), "samples/grid_step0000004.png")
            mlflow.log_metric("fid", 123.0, step=4)
            version = log_generator(snapshot, spec_file, NAME)
            client = MlflowClient(mlflow_server.url)
            tag_version(client, NAME, version, PROTOCOL, {"fid": 99.5, "kid": 0.25}, run.info.run_id)
            promote(NAME, metric="fid", mode="min", candidate=version, client=client)
    finally:
        mlflow.set_tracking_uri(None)
    return client, version, run.info.run_id, spec


def facts(card) -> list[str]:
    client, version, run_id, spec = card
    return [spec.name, spec.sha(), GIT, "http://reader:***@127.0.0.1:9/shards/craters", FINGERPRINT,
            "HorizontalFlip, Rotate", SEARCH, PROTOCOL.key(), "holdout=0.1", "64 samples", "99.5", "0.25",
            f"runs:/{run_id}/samples/grid_step0000004.png", f"runs:/{run_id}/spec.yaml", f"git checkout {GIT}",
            "orbitgen train spec.yaml", run_id]


def test_the_description_holds_every_fact_and_no_password(card):
    client, version, run_id, spec = card
    text = client.get_model_version(NAME, version).description
    print(text)   # the card as the registry returns it (pytest -s shows it)
    missing = [f for f in facts(card) if f not in text]
    assert not missing, f"missing from the card: {missing}\n{text}"
    assert PASSWORD not in text and len(text) <= CARD_MAX_CHARS
    assert f"{client.tracking_uri}/#/experiments/" in text      # the run's page on this server


def test_models_show_prints_the_same_facts(card, mlflow_server):
    client, version, run_id, spec = card
    out = CliRunner().invoke(main, ["models", "show", f"{NAME}/{version}", "--tracking-uri", mlflow_server.url])
    assert out.exit_code == 0, out.output
    missing = [f for f in facts(card) if f not in out.output]
    assert not missing, f"missing from `models show`: {missing}\n{out.output}"
    assert PASSWORD not in out.output


def test_promote_prints_the_champions_page_on_the_server(card, mlflow_server):
    client, version, run_id, spec = card
    out = CliRunner().invoke(main, ["models", "promote", NAME, "--version", version, "--tracking-uri", mlflow_server.url])
    assert out.exit_code == 0, out.output
    assert f"champion v{version}: {mlflow_server.url}/#/models/{NAME}/versions/{version}" in out.output
