"""Where a registered model version came from, and what was made from it (`orbitgen models show`).

Everything is read from what training, `orbitgen eval`, `promote` and `models generate` record:
- the run's tags: spec sha, git sha (and `orbitgen.git_dirty`), data fingerprint, the MineAug
  search run, and `orbitgen.built_on`: the models the spec's `model.*_from` keys named, as given
  (`models:/diffusion-uncond@champion`) and as resolved (version, run). The logged spec holds
  local paths there (the driver replaces each ref by the file it downloaded), hence the tag;
- the run's metrics; the registered model's `spec.yaml` artifact (augment.mineaug);
- the version's tags: scores by evaluation protocol (`protocol.read_version_tags`) and the
  generated sets; the registered model's aliases and `orbitgen.champion_history`.
`version_lineage` gathers it as plain data; the CLI formats it.

The generated sets: one tag per set, `orbitgen.generated.<set id>` (the id a hash of the set's URL
and fingerprint), written in one call with no read before it, so two `models generate` finishing at
once on one version both stay recorded, and a retried write of the same set is the same tag.
Older versions appended to one JSON list, `orbitgen.generated`, read then write (two writers at once
could lose one entry); that list is still read, and still written as a summary for its readers,
but the per-set tags are what counts.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs.runtime.env import tracking_uri_restored
from jobs.tracking.protocol import TAG_CHAMPION_HISTORY, read_version_tags
from jobs.tracking.runs import TAG_DATA, TAG_GIT, TAG_SEARCH, TAG_SPEC
from jobs.tracking.stores import client as store_client, registry_uri
from jobs.tracking.versions import model_version

TAG_GIT_DIRTY = "orbitgen.git_dirty"
TAG_BUILT_ON = "orbitgen.built_on"
TAG_GENERATED = "orbitgen.generated"   # written by `models generate` (jobs/generate.py); + ".<set id>" per set


def given_refs(model: Mapping[str, Any]) -> dict[str, str]:
    """The `model.*_from` references of a spec's model section, before the driver resolves them."""
    return {k: v for k, v in model.items() if k.endswith("_from") and isinstance(v, str) and v}


def built_on_tag(refs: Mapping[str, str], tracking_uri: str) -> dict[str, str]:
    """The run tag recording `refs` (from `given_refs`): each as given, and for a registry or run
    ref the version and run it meant at training time (an alias moves later). {} without refs."""
    if not refs:
        return {}
    client = store_client(tracking_uri)
    out = {}
    for key, ref in refs.items():
        entry: dict[str, str | None] = {"ref": ref}
        try:
            if ref.startswith("models:/"):
                name, at, rest = ref.removeprefix("models:/").partition("@")
                v = (client.get_model_version_by_alias(name, rest) if at
                     else client.get_model_version(*name.split("/")[:2]))
                entry |= {"name": v.name, "version": str(v.version), "run_id": v.run_id}
            elif ref.startswith("runs:/"):
                entry["run_id"] = ref.removeprefix("runs:/").split("/")[0]
        except MlflowException:
            pass   # resolution already succeeded; the ref as given still says what it was
        out[key] = entry
    return {TAG_BUILT_ON: json.dumps(out, sort_keys=True)}


def version_lineage(client: MlflowClient, name: str, *, alias: str | None = None,
                    version: str | None = None) -> dict[str, Any]:
    """Everything recorded about one version of `name` (by alias or number); UserError when there is none."""
    v = model_version(client, name, alias=alias, number=version)
    model = client.get_registered_model(name)
    aliases = dict(model.aliases or {})
    run = client.get_run(v.run_id) if v.run_id else None
    tags = dict(run.data.tags) if run else {}
    spec_text = _spec_text(client, v)
    spec = yaml.safe_load(spec_text) if spec_text else {}
    history = [str(h) for h in json.loads((model.tags or {}).get(TAG_CHAMPION_HISTORY) or "[]")]
    current = str(aliases.get("champion", ""))
    return {
        "name": name,
        "version": str(v.version),
        "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
        "all_aliases": {a: str(n) for a, n in aliases.items()},
        "champion_history": history,
        # Versions that were champion before the current one, latest first.
        "previous_champions": [h for h in reversed(history) if h != current],
        "was_champion": str(v.version) in history and str(v.version) != current,
        "run_id": v.run_id,
        "source": v.source,
        "spec_sha": tags.get(TAG_SPEC),
        "spec": spec_text,
        "git_sha": tags.get(TAG_GIT),
        "git_dirty": {"true": True, "false": False}.get(tags.get(TAG_GIT_DIRTY, "")),
        "data_fingerprint": tags.get(TAG_DATA),
        "data_train": (spec.get("data") or {}).get("train"),
        "augmentations": list((spec.get("augment") or {}).get("mineaug") or []),
        "search_run": tags.get(TAG_SEARCH) or (spec.get("augment") or {}).get("search_run"),
        "evaluations": [{"protocol_key": key, "protocol": protocol, "scores": scores, "run": by}
                        for key, (protocol, scores, by) in sorted(read_version_tags(dict(v.tags or {})).items())],
        "run_metrics": dict(sorted(run.data.metrics.items())) if run else {},
        "built_on": _built_on(tags, spec),
        "generated": read_generated(v.tags or {}),
    }


def generated_tag(entry: Mapping[str, Any]) -> tuple[str, str]:
    """The version tag (key, value) that records one generated set (`entry` has its "url" and
    "fingerprint"): the same set gives the same key, another set another key."""
    set_id = hashlib.sha256(f"{entry['url']}\0{entry.get('fingerprint', '')}".encode()).hexdigest()[:16]
    return f"{TAG_GENERATED}.{set_id}", json.dumps({**entry, "set": set_id}, sort_keys=True)


def read_generated(tags: Mapping[str, str]) -> list[dict]:
    """The sets generated from a version, oldest first: those of the old single list (entries
    without a set id), then one per `orbitgen.generated.<set id>` tag, by their time."""
    try:
        old = [e for e in json.loads(tags.get(TAG_GENERATED) or "[]") if "set" not in e]
    except ValueError:
        old = []
    sets = []
    for key, value in tags.items():
        if key.startswith(TAG_GENERATED + "."):
            try:
                sets.append(json.loads(value))
            except ValueError:
                continue
    return old + sorted(sets, key=lambda e: (e.get("created", ""), e.get("set", "")))


def generated_summary(tags: Mapping[str, str]) -> str:
    """The old single-list tag's value rebuilt from the per-set tags, for readers of that form."""
    return json.dumps(read_generated(tags))


def _built_on(tags: Mapping[str, str], spec: Mapping[str, Any]) -> dict[str, dict]:
    """{model key: {"ref", "name"?, "version"?, "run_id"?}}: the run's tag, else the spec's values."""
    if tags.get(TAG_BUILT_ON):
        return json.loads(tags[TAG_BUILT_ON])
    return {k: {"ref": v} for k, v in given_refs(spec.get("model") or {}).items()}


def _spec_text(client: MlflowClient, v) -> str | None:
    """The registered model's `spec.yaml` artifact; the run's own `spec.yaml` where the model lacks one."""
    import mlflow.artifacts
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = client.tracking_uri
    # As in model_refs.resolve_ref: models:/ downloads also open the *current* tracking store.
    with tempfile.TemporaryDirectory(prefix="orbitgen-lineage-") as tmp, tracking_uri_restored(), _use_tracking_uri(uri):
        for i, artifact in enumerate((f"models:/{v.name}/{v.version}/artifacts/spec.yaml", f"runs:/{v.run_id}/spec.yaml")):
            try:
                path = mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=f"{tmp}/{i}",
                                                           tracking_uri=uri, registry_uri=registry_uri(uri))
            except (MlflowException, OSError):
                continue
            return Path(path).read_text()
    return None
