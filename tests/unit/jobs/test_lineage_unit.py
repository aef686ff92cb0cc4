"""Lineage without a training: `git_dirty`, version references, the `orbitgen.built_on` tag, the
generated sets (one tag per set, the old single list still read), and `version_lineage` on a
registry written by hand (the trained case: tests/integration/test_lineage.py; two writers at once:
tests/integration/test_lineage_concurrent_generated.py)."""
from __future__ import annotations

import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError
from jobs.runtime.env import git_dirty
from jobs.generate import record_on_version
from jobs.tracking.lineage import (TAG_BUILT_ON, TAG_GENERATED, built_on_tag, generated_tag, given_refs,
                                   read_generated, version_lineage)
from jobs.tracking.versions import parse_version_ref


def git(path, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path, check=True,
                   capture_output=True)


def test_git_dirty_says_whether_the_tree_differs_from_head(tmp_path, monkeypatch):
    monkeypatch.delenv("ORBITGEN_GIT_SHA", raising=False)
    assert git_dirty(tmp_path) == "unknown"          # not a repository
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-qm", "a")
    assert git_dirty(tmp_path) == "false"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_dirty(tmp_path) == "true"
    git(tmp_path, "commit", "-qam", "b")
    (tmp_path / "new_family.py").write_text("")   # untracked code changes what a sha reproduces
    assert git_dirty(tmp_path) == "true"
    monkeypatch.setenv("ORBITGEN_GIT_SHA", "abc")     # a submitted job: its copy has no .git
    assert git_dirty(tmp_path) == "unknown"


def test_version_refs():
    assert parse_version_ref("gen") == ("gen", None, None)
    assert parse_version_ref("gen@champion") == ("gen", "champion", None)
    assert parse_version_ref("gen/3") == ("gen", None, "3")
    assert parse_version_ref("models:/gen@challenger") == ("gen", "challenger", None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """`base` v1 and v2 (v2 champion after v1, history kept), `made` v1 built on base@champion."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(3)]
    client.create_registered_model("base", tags={"orbitgen.champion_history": json.dumps(["1", "2"])})
    for run in runs[:2]:
        client.create_model_version("base", f"runs:/{run}/generator", run)
    client.set_registered_model_alias("base", "champion", "2")
    client.log_metric(runs[0], "fid", 3.5)
    client.set_tag(runs[0], "orbitgen.git_dirty", "true")
    client.set_model_version_tag("base", "1", "orbitgen.generated",
                                 json.dumps([{"url": "s3://b/g", "n": 10, "seeds": [0, 9], "fingerprint": "ab"}]))
    return uri, client, runs


def test_built_on_records_the_version_an_alias_meant(store):
    uri, client, runs = store
    refs = given_refs({"generator_from": "models:/base@champion", "ngf": 8, "base_from": None,
                       "other_from": "/m/g.pt"})
    assert refs == {"generator_from": "models:/base@champion", "other_from": "/m/g.pt"}
    tag = json.loads(built_on_tag(refs, uri)[TAG_BUILT_ON])
    assert tag["generator_from"] == {"ref": "models:/base@champion", "name": "base", "version": "2", "run_id": runs[1]}
    assert tag["other_from"] == {"ref": "/m/g.pt"}
    assert built_on_tag({}, uri) == {}


def test_version_lineage_reads_what_was_recorded(store):
    uri, client, runs = store
    info = version_lineage(client, "base", version="1")
    assert (info["version"], info["run_id"], info["aliases"]) == ("1", runs[0], [])
    assert info["was_champion"] and info["previous_champions"] == ["1"]
    assert info["git_dirty"] is True and info["run_metrics"] == {"fid": 3.5}
    assert info["generated"][0]["url"] == "s3://b/g"
    assert info["spec"] is None and info["evaluations"] == [] and info["built_on"] == {}
    champion = version_lineage(client, "base", alias="champion")
    assert champion["version"] == "2" and champion["aliases"] == ["champion"] and not champion["was_champion"]
    assert champion["git_dirty"] is None   # not recorded: a run from before the tag existed


@pytest.mark.parametrize("kw, names", [({"alias": "best"}, ["'best'", "champion=v2"]),
                                       ({"version": "9"}, ["version 9", "versions: 1, 2"])])
def test_an_unknown_version_names_what_exists(store, kw, names):
    with pytest.raises(UserError) as e:
        version_lineage(store[1], "base", **kw)
    assert all(n in str(e.value) for n in names)
    with pytest.raises(UserError, match="registered: base"):
        version_lineage(store[1], "nope", alias="champion")


def test_generated_sets_one_tag_each_after_the_old_list(store):
    """v1 has the old single-list tag (an older orbitgen wrote it); new sets get a tag each, the old
    entry is still read first, the same set recorded again (a retry) is one entry, and the old tag
    is kept as a summary for its readers."""
    uri, client, runs = store
    for url in ("s3://b/new1", "s3://b/new2", "s3://b/new1"):
        record_on_version(client, "base", "1", {"url": url, "n": 4, "seeds": [0, 3], "fingerprint": "f-" + url})
    tags = client.get_model_version("base", "1").tags
    made = ["s3://b/g", "s3://b/new2", "s3://b/new1"]       # by when each set was last recorded
    assert [e["url"] for e in read_generated(tags)] == made
    assert len([k for k in tags if k.startswith(TAG_GENERATED + ".")]) == 2
    assert [e["url"] for e in json.loads(tags[TAG_GENERATED])] == made
    assert [g["url"] for g in version_lineage(client, "base", version="1")["generated"]] == made
    key, _ = generated_tag({"url": "s3://b/new1", "fingerprint": "other bytes"})
    assert key not in tags                      # another set at the same URL is another entry
