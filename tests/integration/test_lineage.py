"""`orbitgen models show NAME@ALIAS` on real parts: where a version came from and what was made
from it. A tiny sat2ground stage 1 (MineAug augmentations chosen by a search run) and a stage 2
built on its `@champion` are trained once on the MLflow server; an evaluation, a generated set
and a later champion are recorded as `orbitgen eval`, `models generate` and `promote` record them."""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.cli import main
from jobs.runtime.env import REPO
from jobs.train.driver import run_job
from jobs.spec import SPECS_DIR, load_spec
from jobs.tracking.protocol import EvalProtocol, version_tags
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
S1, S2 = "lineage-stage1", "lineage-stage2"
PROTOCOL = EvalProtocol(data_fingerprint="f" * 64, split="holdout=0.1", real_seed=3, seed_base=1000, num_samples=64,
                        extractors={"randconv": "0123456789abcdef"})


def train(name: str, work, uri: str, *extra: str):
    sets = tiny_sets(name, f"workdir={work}", f"tracking.uri={uri}", "scaling.num_workers=1", *extra)
    spec = load_spec(SPECS_DIR / f"{name}.yaml", sets)
    return spec, run_job(spec, say=print)


@pytest.fixture(scope="module")
def models(mlflow_server, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("lineage")
    client = MlflowClient(mlflow_server.url)
    # The search that chose the augmentations: a run of its own, as `orbitgen search mineaug` leaves.
    search = client.create_run(client.create_experiment("lineage-search")).info.run_id
    spec1, first = train("sat2ground_stage1", work / "s1", mlflow_server.url, f"tracking.registry_model={S1}",
                         "augment.mineaug=[HorizontalFlip, Rotate]", f"augment.search_run={search}")
    spec2, second = train("sat2ground_stage2", work / "s2", mlflow_server.url, f"tracking.registry_model={S2}",
                          f"model.generator_from=models:/{S1}@champion")
    # What `orbitgen eval` writes on the version, and a later champion with the history `promote` keeps.
    for k, v in version_tags(PROTOCOL, {"fid": 12.5, "kid": 0.25}, second.run_id).items():
        client.set_model_version_tag(S1, "1", k, v)
    client.create_model_version(S1, f"runs:/{first.run_id}/generator", first.run_id)
    client.set_registered_model_alias(S1, "champion", "2")
    client.set_registered_model_alias(S1, "challenger", "1")
    client.set_registered_model_tag(S1, "orbitgen.champion_history", json.dumps(["1", "2"]))
    return {"work": work, "search": search, "spec1": spec1, "first": first, "spec2": spec2, "second": second}


def show(uri: str, *args: str) -> str:
    res = CliRunner().invoke(main, ["models", "show", *args, "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    return res.stdout


def line(text: str, label: str) -> str:
    found = [x for x in text.splitlines() if x.strip().startswith(label)]
    assert found, f"no {label!r} line in:\n{text}"
    return found[0]


def test_show_says_where_a_version_came_from(models, mlflow_server):
    uri, first = mlflow_server.url, models["first"]
    out = CliRunner().invoke(main, ["models", "generate", f"models:/{S1}/1", "--n", "6", "--shard-size", "3",
                                    "--out", str(models["work"] / "made"), "--tracking-uri", uri])
    assert out.exit_code == 0, out.output

    text = show(uri, f"{S1}/1")
    # Which version, its aliases, and that it was champion before the current one.
    assert text.splitlines()[0] == f"{S1} v1  [challenger, was champion]"
    assert "before the current one: v1" in line(text, "champions")
    assert line(text, "run").split()[-1] == first.run_id
    # Spec: its sha and the spec itself (the registered model's spec.yaml).
    assert line(text, "spec sha").split()[-1] == models["spec1"].sha()
    spec_text = text.split("  spec.yaml:\n", 1)[1]
    spec = yaml.safe_load("\n".join(x[4:] for x in spec_text.splitlines()))
    assert spec["name"] == "sat2ground-stage1" and spec["model"]["stage"] == 1
    # Git: the commit and whether the work tree had changes.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    assert line(text, "git sha") == f"  git sha       {head} ({'dirty work tree' if dirty else 'clean'})"
    # Data, augmentations and the search run that chose them.
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).data.tags["orbitgen.data_fingerprint"] in line(text, "data")
    assert line(text, "augment") == f"  augment       HorizontalFlip, Rotate (search run {models['search']})"
    # The evaluation protocol and its scores; the run's own metrics.
    evaluation = text.split("  evaluation    ", 1)[1]
    assert f"protocol {PROTOCOL.key()}: data ffffffffffff split holdout=0.1, 64 samples, seed base 1000" in evaluation
    assert "randconv 0123456789abcdef" in evaluation and "fid=12.5  kid=0.25" in evaluation
    metrics = client.get_run(first.run_id).data.metrics
    assert metrics and all(f"{m}={v:.6g}" in line(text, "run metrics") for m, v in metrics.items())
    # The set generated from it.
    assert line(text, "generated") == f"  generated     {(models['work'] / 'made').as_uri()}: 6 images, seeds 0..5"

    # NAME@champion is the other version; NAME alone lists both, marking the former champion.
    assert show(uri, f"{S1}@champion").splitlines()[0] == f"{S1} v2  [champion]"
    listing = show(uri, S1).splitlines()
    assert listing[0].split()[:2] == ["v1", "challenger"] and listing[1].split()[:2] == ["v2", "champion"]


def test_show_names_the_model_a_stage_2_encoder_was_built_on(models, mlflow_server):
    text = show(mlflow_server.url, f"{S2}@champion")
    # The version its `@champion` meant at training time (v1), though the alias has moved to v2 since.
    assert line(text, "built on") == (f"  built on      model.generator_from: models:/{S1}@champion = {S1} v1 "
                                      f"(run {models['first'].run_id})")
    assert "was champion" not in text.splitlines()[0] and "generated     none" in text


def test_show_of_an_unknown_version_or_alias_says_what_exists(models, mlflow_server):
    for ref, names in ((f"{S1}/9", ["version 9", "versions: 1, 2"]), (f"{S1}@best", ["'best'", "champion=v2"])):
        res = CliRunner().invoke(main, ["models", "show", ref, "--tracking-uri", mlflow_server.url])
        assert res.exit_code == 2 and all(n in res.stderr for n in names), res.output
