"""`orbitgen models promote` and `rollback` against a real MLflow server (artifacts on the S3
server): refuses incomparable versions naming the difference and the fix, promotes a comparable
better one with the table printed and logged on its run, rolls back; `--reevaluate` evaluates
the champion of a real registered generator under the candidate's protocol on Ray."""
from __future__ import annotations

from dataclasses import replace

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.cli import main
from jobs.eval.model import evaluate_model
from jobs.spec import SPECS_DIR, load_spec
from jobs.tracking.protocol import EvalProtocol, read_version_tags
from jobs.tracking.registry import log_generator
from models.snapshot import save_snapshot

from registered_versions import scored_version
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
P = EvalProtocol(data_fingerprint="cafe" * 4, split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})
P_OTHER = replace(P, extractors={"orbitgen-randconv64-v1": "1234123412341234"})


def cli(*args: str):
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_refuse_promote_with_table_and_rollback(mlflow_server):
    uri, name = mlflow_server.url, "promote-cli"
    client = MlflowClient(uri)
    experiment = client.create_experiment(name)
    client.create_registered_model(name)

    def version(protocol, scores):
        return scored_version(client, experiment, name, protocol, scores)

    v1 = version(P, {"fid": 5.0, "kid": 0.3})
    v2 = version(P_OTHER, {"fid": 2.0, "kid": 0.1})     # better, but with other extractor weights
    v3 = version(P, {"fid": 4.0, "kid": 0.2, "precision": 0.5})
    assert cli("models", "promote", name, "--version", v1, "--tracking-uri", uri)[0] == 0

    code, out, err = cli("models", "promote", name, "--version", v2, "--tracking-uri", uri)
    assert code == 4, (out, err)                        # no shared protocol: refused, nothing written
    assert "extractors: {'orbitgen-randconv64-v1': '1234123412341234'} vs" in out, out
    assert f"orbitgen eval models:/{name}/{v1} --metrics fid" in out and "--reevaluate" in out, out
    model = client.get_registered_model(name)
    assert str(model.aliases["champion"]) == v1 and "challenger" not in model.aliases, model.aliases

    code, out, err = cli("models", "promote", name, "--version", v3, "--min-improvement", "0.25",
                         "--tracking-uri", uri)
    assert code == 3 and "does not beat" in out and "20.00% better, needs +25.0%" in out, out
    assert str(client.get_registered_model(name).aliases["challenger"]) == v3
    code, out, err = cli("models", "promote", name, "--version", v3, "--min-improvement", "0.2",
                         "--tracking-uri", uri)
    assert code == 0 and f"v{v3} beats champion v{v1}" in out, out
    assert f"protocol {P.key()}" in out and "fid *" in out and "kid" in out and "precision" not in out
    logged = [a.path for a in client.list_artifacts(client.get_model_version(name, v3).run_id, "promotion")]
    assert len(logged) == 2 and all(p.endswith(f"-v{v3}-vs-v{v1}.txt") for p in logged), logged
    assert str(client.get_registered_model(name).aliases["champion"]) == v3

    code, out, err = cli("models", "rollback", name, "--tracking-uri", uri)
    assert code == 0 and f"champion v{v3} → v{v1}" in out, out
    assert str(client.get_registered_model(name).aliases["champion"]) == v1
    code, out, err = cli("models", "rollback", name, "--tracking-uri", uri)
    assert code == 2 and "no previous champion" in err, err


def test_reevaluate_evaluates_the_champion_under_the_candidates_protocol(mlflow_server, ray_local, tmp_path):
    uri, name = mlflow_server.url, "promote-reevaluate"
    spec = load_spec(SPECS_DIR / "quickstart.yaml", tiny_sets("quickstart", f"workdir={tmp_path / 'work'}"))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    family = spec.make_family()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(name)
    try:
        for seed in (0, 1):                    # two untrained generators, registered as training does
            torch.manual_seed(seed)
            snapshot = tmp_path / f"g{seed}" / "generator.pt"
            snapshot.parent.mkdir()
            save_snapshot(snapshot, family, family.build()[family.sampler_role])
            with mlflow.start_run():
                log_generator(snapshot, spec_file, name)
    finally:
        mlflow.set_tracking_uri(None)
    champion = evaluate_model(f"models:/{name}/1", tracking_uri=uri, metrics=["fid"], num_samples=16)
    candidate = evaluate_model(f"models:/{name}/2", tracking_uri=uri, metrics=["fid"], num_samples=8)
    assert champion.protocol.differences(candidate.protocol) == ["num_samples: 16 vs 8"]
    assert cli("models", "promote", name, "--version", "1", "--tracking-uri", uri)[0] == 0
    code, out, err = cli("models", "promote", name, "--version", "2", "--tracking-uri", uri)
    assert code == 4 and "num_samples: 8 vs 16" in out, (out, err)
    assert "--reevaluate" in out, out

    code, out, err = cli("models", "promote", name, "--version", "2", "--reevaluate", "--tracking-uri", uri)
    client = MlflowClient(uri)
    recorded = read_version_tags(client.get_model_version(name, "1").tags)
    key = candidate.protocol.key()
    assert set(recorded) == {champion.protocol.key(), key}        # v1 now also under v2's protocol
    assert f"protocol {key}" in out and "8 samples" in out
    fid1, fid2 = recorded[key][1]["fid"], candidate.scores["fid"]
    assert code == (0 if fid2 < fid1 else 3), (out, err)
    assert str(client.get_registered_model(name).aliases["champion"]) == ("2" if fid2 < fid1 else "1"), out
