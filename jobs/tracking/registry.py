"""The MLflow model registry: log a generator as a pyfunc, register it, promote by metric, roll back.

`champion` moves only to a version that beats the current champion on a metric, both measured
under one evaluation protocol (`promotion`), by at least a margin; a version that does not is
marked `challenger`. Each move happens under the registered model's promotion lock
(`registry_lock`: MLflow has no compare-and-set) and appends to the model's champion history
(tag `orbitgen.champion_history`), which `rollback` walks back. Stages are deprecated in
MLflow: aliases only. `promote` returns its outcome (`PROMOTED`, `ALREADY_CHAMPION`,
`NOT_BETTER`, `INCOMPARABLE`, `LOCK_BUSY`) for the CLI's exit code and `--json`.

Every registered version carries a model card: its MLflow description, in markdown
(`write_model_card`), written when it is registered and again when its evaluations change
(`promote`, `orbitgen eval`). It holds what `orbitgen models show NAME/VERSION` prints (both read
`card_facts`): the spec and its hash, the git commit, the data URL (password masked) and
fingerprint, the augmentations and the search run that chose them, the evaluations with their
protocols, the sample grid's artifact path, and the commands that train it again.

Registration cannot duplicate: a retried `log_generator` (a server error after the version was
written, or `train --resume` after the server stayed away) finds the version it made by its
registration token (tag `orbitgen.registration` on the version and on the run; the token is a
hash of the run, the snapshot's bytes and the model name) before it creates one.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from data_shards.errors import UserError
from jobs.runtime import console
from jobs.runtime.redact import redact
from jobs.tracking.buffered import retried
from jobs.tracking.promotion import (Evaluation, beats, common, compared, evaluations, improvement, incomparable,
                                     preferred, table)
from jobs.tracking.protocol import TAG_CHAMPION_HISTORY, EvalProtocol
from jobs.tracking.registry_lock import LockBusy, LockLost, is_lock, promotion_lock
from jobs.tracking.stores import client as store_client, registry_used
from jobs.tracking.versions import model_version, registered_model, registered_names

REPO = Path(__file__).resolve().parents[2]
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_REGISTRATION = "orbitgen.registration"     # on the run and on the version it registered
# What `promote` did (`Promotion.outcome`).
PROMOTED, ALREADY_CHAMPION, NOT_BETTER, INCOMPARABLE, LOCK_BUSY = (
    "promoted", "already-champion", "not-better", "incomparable", "lock-busy")
LOCK_TRIES = 3   # a lease lost mid-promotion (see registry_lock) starts the promotion again, this often


def family_code(cls: type) -> list[str]:
    """A family from outside `models/` (a lab's own package): its top-level package travels with
    the model, so the registered model loads where that package is not installed."""
    import importlib

    top = cls.__module__.split(".")[0]
    if top == "models":
        return []
    origin = Path(importlib.import_module(top).__file__ or "")
    return [str(origin.parent if origin.name == "__init__.py" else origin)]


def log_generator(snapshot: Path, spec_file: Path, registered_name: str | None) -> str | None:
    """Logs the snapshot as the active run's model `generator`; returns the registered version.
    Called again for the same run and snapshot (a retry), it returns the version it registered."""
    from jobs.tracking.pyfunc import input_columns
    from models.png import encode_png
    from models.snapshot import load_snapshot

    family, _, _ = load_snapshot(snapshot)
    r, c = family.resolution, family.channels
    columns = input_columns(family)
    if family.conditional:
        inputs = Schema([ColSpec("binary", name) for name in columns])
        # Two mid-grey inputs of the model's size (masks have 1 channel); PNG holds 1 or 3 channels only.
        shape = {"cond": (r, r, c), "mask": (r, r, 1)}
        example = (pd.DataFrame({n: [encode_png(np.full(shape[n], 128, np.uint8))] * 2 for n in columns})
                   if c in (1, 3) else None)
    else:
        inputs = Schema([ColSpec("long", "seed")])
        example = pd.DataFrame({"seed": [0, 1]})
    signature = ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, c))]))
    with console.prints_to_log("mlflow"):
        # A server away (at the end of a run, after an outage) is waited for, within a bound.
        with registry_used(mlflow.get_tracking_uri()):
            run = mlflow.active_run()
            if registered_name is None or run is None:   # no run to find a registration by: register once
                info = retried(_log_model, snapshot, spec_file, family, signature, example, registered_name)
                if not registered_name:
                    return None
                retried(write_model_card, MlflowClient(), registered_name, str(info.registered_model_version))
                return str(info.registered_model_version)
            token = registration_token(run.info.run_id, snapshot, registered_name)
            found = retried(registered_version, MlflowClient(), registered_name, run.info.run_id, token)
            if found is not None:
                return found
            # The token goes on the run first: a retry after a lost answer looks for it (and the version).
            retried(mlflow.set_tag, TAG_REGISTRATION, token)
            model_uri = retried(_logged_model, snapshot, spec_file, family, signature, example, run, token)
            version = retried(_register, model_uri, registered_name, run.info.run_id, token)
            retried(write_model_card, MlflowClient(), registered_name, version)
            return version


CARD_MAX_CHARS = 5000   # MLflow's stores hold a version description of at most 5000 characters


def card_facts(client: MlflowClient, name: str, *, alias: str | None = None, version: str | None = None) -> dict:
    """What the model card and `models show NAME/VERSION` say about one version: its lineage
    (`lineage.version_lineage`) plus the data URL, the sample grid, the evaluations (those of its
    run until the version has its own) and the commands that reproduce it."""
    from jobs.tracking.lineage import version_lineage
    from jobs.tracking.runs import run_link

    info = version_lineage(client, name, alias=alias, version=version)
    run = client.get_run(info["run_id"]) if info["run_id"] else None
    spec = yaml.safe_load(info["spec"]) if info["spec"] else {}
    info["spec_name"] = (spec or {}).get("name")
    info["augment"] = (spec or {}).get("augment") or {}
    info["data_url"] = _data_url(run) or info["data_train"]
    info["sample_grid"] = _sample_grid(client, info["run_id"]) if run else None
    info["card_evaluations"] = evaluations(client, client.get_model_version(name, info["version"]))
    uri = redact(client.tracking_uri)
    info["tracking_uri"] = uri
    info["run_link"] = run_link(client.tracking_uri, run.info.experiment_id, run.info.run_id) if run else None
    commit = info["git_sha"] if info["git_sha"] not in (None, "", "unknown") else None
    info["reproduce"] = ([f"git checkout {commit}"] if commit else []) + (
        [f"MLFLOW_TRACKING_URI={uri} mlflow artifacts download -u runs:/{info['run_id']}/spec.yaml -d .",
         "orbitgen train spec.yaml"] if info["run_id"] else [])
    return info


def _data_url(run) -> str | None:
    """The shard set the run trained on, from its dataset input (the manifest's location), password masked."""
    for given in (run.inputs.dataset_inputs if run is not None and run.inputs else []):
        try:
            source = json.loads(given.dataset.source)
        except ValueError:
            continue
        where = source.get("uri") or source.get("path") or source.get("url")
        if where:
            return redact(str(where).removesuffix("/manifest.parquet"))
    return None


def _sample_grid(client: MlflowClient, run_id: str) -> str | None:
    """The run's last sample grid (`samples/grid_stepNNNNNNN.png`, logged at each evaluation) as an artifact URI."""
    try:
        grids = sorted(f.path for f in client.list_artifacts(run_id, "samples")
                       if Path(f.path).name.startswith("grid_step") and f.path.endswith(".png"))
    except (MlflowException, OSError):
        return None
    return f"runs:/{run_id}/{grids[-1]}" if grids else None


def model_card(info: dict) -> str:
    """The markdown description of a version (`info` from `card_facts`), at most CARD_MAX_CHARS long:
    evaluations that do not fit are counted, not shown."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|")

    aug = info["augment"]
    dirty = {True: " (work tree had uncommitted changes)", False: "", None: ""}[info["git_dirty"]]
    head = [f"# {info['name']} v{info['version']}", "",
            "| | |", "|---|---|",
            f"| spec | `{cell(info['spec_name'] or '?')}`, sha `{info['spec_sha'] or 'unknown'}`: "
            f"`runs:/{info['run_id']}/spec.yaml` |",
            f"| git commit | `{info['git_sha'] or 'unknown'}`{dirty} |",
            f"| data | `{cell(info['data_url'] or 'unknown')}`, fingerprint `{info['data_fingerprint'] or 'unknown'}` |",
            f"| augmentations | MineAug: {cell(', '.join(info['augmentations']) or 'none')}; "
            f"ADA: {cell(json.dumps(aug.get('ada')) if aug.get('ada') else 'off')} |",
            f"| search run | {'`' + info['search_run'] + '`' if info['search_run'] else 'none'} |",
            f"| training run | `{info['run_id']}` ({cell(info['run_link'] or 'no run')}) |",
            f"| sample grid | {'`' + info['sample_grid'] + '`' if info['sample_grid'] else 'none logged'} |",
            f"| tracking | `{info['tracking_uri']}` |"]
    for key, ref in sorted(info["built_on"].items()):
        meant = f" = {ref['name']} v{ref['version']}" if ref.get("version") else ""
        head.append(f"| built on | model.{key}: `{cell(ref['ref'])}`{cell(meant)} |")
    evals = info["card_evaluations"]
    metrics = sorted({m for e in evals for m in e.scores})
    rows = []
    for e in evals:
        p = e.protocol
        where = (f"`{e.key}` | data `{p.data_fingerprint[:12]}` {cell(p.split)}, {p.num_samples} samples, seeds "
                 f"{p.seed_base} (reals {p.real_seed}), extractors "
                 f"{cell(', '.join(f'{n} {h}' for n, h in sorted(p.extractors.items())) or 'none')}"
                 if p else "none recorded | -")
        rows.append(f"| {where} | " + " | ".join(f"{e.scores[m]:.6g}" if m in e.scores else "" for m in metrics)
                    + f" | `{e.run_id}` |")
    table = ["", "## Evaluations", ""]
    if rows:
        table += [f"| protocol | measured under | {' | '.join(metrics)} | run |",
                  "|---" * (len(metrics) + 3) + "|"]
    else:
        table.append("none yet (`orbitgen eval` records one)")
    tail = ["", "## Reproduce", "", "```bash", *info["reproduce"], "```",
            "", "Passwords in URLs are masked (`***`) here and in the logged spec: set them again before training."]
    for shown in range(len(rows), -1, -1):   # the longest card that fits
        more = [f"", f"{len(rows) - shown} more evaluations in the version's tags (`orbitgen.eval.*`)"] if shown < len(rows) else []
        text = "\n".join(head + table + rows[:shown] + more + tail)
        if len(text) <= CARD_MAX_CHARS:
            return text
    return text[:CARD_MAX_CHARS]


def write_model_card(client: MlflowClient, name: str, version: str) -> str:
    """Writes version `version` of `name`'s model card (its description) from what is recorded now; returns it."""
    text = model_card(card_facts(client, name, version=str(version)))
    client.update_model_version(name, str(version), description=text)
    return text


def _refresh_card(client: MlflowClient, name: str, version: str) -> None:
    """The version's card written again; a version whose run was deleted keeps the card it has
    (a card never stops a promotion)."""
    try:
        write_model_card(client, name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def registration_token(run_id: str, snapshot: Path, name: str) -> str:
    """The same for the same run, snapshot bytes and model name: what a retried registration looks up."""
    h = hashlib.sha256(f"{run_id}\0{name}\0".encode())
    with open(snapshot, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def registered_version(client: MlflowClient, name: str, run_id: str, token: str) -> str | None:
    """The version of `name` that the registration `token` of run `run_id` made, or None."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    mine = sorted((int(v.version) for v in found if (v.tags or {}).get(TAG_REGISTRATION) == token))
    return str(mine[0]) if mine else None


def _logged_model(snapshot, spec_file, family, signature, example, run, token: str) -> str:
    """The URI of the run's model `generator` logged for `token`: the one an earlier try finished, else a new one."""
    try:
        earlier = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                              filter_string=f"source_run_id = '{run.info.run_id}'",
                                              output_format="list")
    except MlflowException:
        earlier = []     # a store without logged models: log again (a logged model is no registry version)
    for m in earlier:
        if (m.tags or {}).get(TAG_REGISTRATION) == token and str(m.status).endswith("READY"):
            return m.model_uri
    return _log_model(snapshot, spec_file, family, signature, example, None, tags={TAG_REGISTRATION: token}).model_uri


def _register(model_uri: str, name: str, run_id: str, token: str) -> str:
    """Registers `model_uri` as a version of `name` tagged with `token`, unless a try whose answer was lost did."""
    found = registered_version(MlflowClient(), name, run_id, token)
    if found is not None:
        return found
    return str(mlflow.register_model(model_uri, name, tags={TAG_REGISTRATION: token}).version)


def _log_model(snapshot, spec_file, family, signature, example, registered_name: str | None, tags=None):
    import torch

    return mlflow.pyfunc.log_model(
        name="generator",
        python_model=str(REPO / "jobs" / "tracking" / "pyfunc.py"),
        artifacts={"snapshot": str(snapshot), "spec": str(spec_file)},
        code_paths=[str(REPO / "models"), *family_code(type(family))],
        signature=signature,
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pydantic", "pillow",
                          "torchmetrics", "kornia", "diffusers", "scikit-learn", f"mlflow=={mlflow.__version__}"],
        registered_model_name=registered_name,
        tags=tags,
    )


@dataclass
class Promotion:
    promoted: bool
    candidate: str
    champion_before: str | None
    candidate_score: float | None
    champion_score: float | None
    reason: str
    table: str = ""                  # the comparison under the common protocol, when there was one
    artifact: str | None = None      # where the table went on the candidate's run
    outcome: str = ""                # PROMOTED, ALREADY_CHAMPION, NOT_BETTER, INCOMPARABLE or LOCK_BUSY
    name: str = ""
    metric: str = ""
    mode: str = ""
    min_improvement: float = 0.0
    protocol: str | None = None      # the key of the protocol both were compared under
    compared: dict[str, dict[str, float]] = field(default_factory=dict)   # every shared metric

    @property
    def champion_after(self) -> str | None:
        return self.candidate if self.outcome in (PROMOTED, ALREADY_CHAMPION) else self.champion_before

    def to_dict(self) -> dict:
        """The machine-readable result (`models promote --json`); JSON has no infinity: None instead."""
        d = asdict(self) | {"champion_after": self.champion_after, "comparison_artifact": self.artifact}
        gain = (improvement(self.candidate_score, self.champion_score, self.mode)
                if None not in (self.candidate_score, self.champion_score) and self.mode else None)
        d["improvement"] = gain
        for k in ("candidate_score", "champion_score", "improvement"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        del d["artifact"]
        return d


def _score(client: MlflowClient, run_id: str, metric: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(metric)
    return None if value is None or math.isnan(value) else value


def _champion(client: MlflowClient, name: str):
    """The champion's model version, or None; a server that fails is an error, not "no champion"."""
    version = (client.get_registered_model(name).aliases or {}).get(CHAMPION)
    return client.get_model_version(name, version) if version is not None else None


def promote(name: str, *, metric: str, mode: str, candidate: str | None = None,
            client: MlflowClient | None = None, min_improvement: float = 0.0, refuse_incomparable: bool = False,
            reevaluate: Callable[[str, EvalProtocol | None], object] | None = None) -> Promotion:
    """Moves `champion` to `candidate` (default: the best version by `metric`) if it beats the
    champion by `min_improvement` (relative, see `promotion`) under a protocol both were evaluated with.

    Without a common protocol: `reevaluate(version, like)` (evaluates a version under protocol
    `like`, recording the scores on its tags) evaluates the champion under the candidate's
    protocol, then it compares again; without it the candidate is marked `challenger` with the
    reason (training's automatic promotion), or, with `refuse_incomparable`, nothing is written and
    the outcome is INCOMPARABLE with what differs and the `orbitgen eval` command that fixes it.
    Read, decision and move happen under the registry lock (`registry_lock`); every move appends
    to `orbitgen.champion_history`. A lock another promotion holds past the wait is no error: the
    outcome is LOCK_BUSY, saying the version is registered but not promoted and how to promote it
    (so a finished training does not fail over it).
    """
    client = client or store_client()
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    if not versions:
        raise UserError(f"no registered model named {name!r}; {registered_names(client)}")
    candidate = (_best_version(name, versions, metric, mode, client) if candidate is None
                 else _version(client, name, str(candidate)))
    _refresh_card(client, name, candidate)   # training tagged its scores just before: the card shows them
    rounds, lost = 0, 0
    champ_version = None
    while True:
        try:
            with promotion_lock(client, name) as still_ours:
                champ = _champion(client, name)
                champ_version = str(champ.version) if champ else None
                cand = evaluations(client, client.get_model_version(name, candidate))
                p = _decide(name, candidate, cand, champ_version, evaluations(client, champ) if champ else [],
                            metric, mode, min_improvement, final=reevaluate is None or rounds == 2,
                            refuse=refuse_incomparable)
                if p is not None:
                    if p.outcome == PROMOTED:
                        _crown(client, name, candidate, champ_version, still_ours)
                    elif p.outcome != ALREADY_CHAMPION and not (p.outcome == INCOMPARABLE and refuse_incomparable):
                        still_ours()
                        client.set_registered_model_alias(name, CHALLENGER, candidate)
                    break
        except LockLost:
            lost += 1
            if lost < LOCK_TRIES:
                continue
            p = _busy(client, name, candidate, champ_version, metric, mode, min_improvement,
                      f"the promotion lock was taken over {lost} times")
            break
        except LockBusy as e:
            p = _busy(client, name, candidate, champ_version, metric, mode, min_improvement, str(e))
            break
        # Evaluation takes minutes: outside the lock; the champion is read again after it.
        rounds += 1
        if preferred(cand, metric) is None:
            reevaluate(candidate, None)
        like = preferred(evaluations(client, client.get_model_version(name, candidate)), metric)
        if champ_version is not None and like is not None:
            reevaluate(champ_version, like.protocol)
    p.name, p.metric, p.mode, p.min_improvement = name, metric, mode, min_improvement
    if rounds:   # evaluated again under a common protocol: their cards show it
        for evaluated in sorted({candidate, champ_version} - {None}):
            _refresh_card(client, name, evaluated)
    if p.table:
        p.artifact = _log_comparison(client, versions[candidate].run_id, p, p.champion_before)
    return p


def _busy(client: MlflowClient, name: str, candidate: str, champion: str | None, metric: str, mode: str,
          min_improvement: float, why: str) -> Promotion:
    """The outcome when the lock could not be had: registered, not promoted, and the command that promotes it."""
    if champion is None:
        try:
            champ = _champion(client, name)
            champion = str(champ.version) if champ else None
        except MlflowException:
            pass
    command = (f"orbitgen models promote {name} --version {candidate} --metric {metric} --mode {mode}"
               + (f" --min-improvement {min_improvement:g}" if min_improvement else "")
               + f" --tracking-uri {redact(client.tracking_uri)}")
    return Promotion(False, candidate, champion, None, None,
                     f"v{candidate} is registered but not promoted: {why}; promote it later: {command}",
                     outcome=LOCK_BUSY)


def _decide(name: str, candidate: str, cand: list[Evaluation], champion: str | None, champ: list[Evaluation],
            metric: str, mode: str, min_improvement: float, final: bool, refuse: bool) -> Promotion | None:
    """The promotion of `candidate` over `champion`; None when they need evaluating under one protocol first."""
    mine = preferred(cand, metric)
    score = mine.scores[metric] if mine else None
    if champion == candidate:
        return Promotion(False, candidate, champion, score, score, f"v{candidate} already is the champion",
                         outcome=ALREADY_CHAMPION)
    shared = common(cand, champ, metric)
    if mine is None or (champion is not None and shared is None):
        if not final:
            return None
        why = incomparable(name, candidate, cand, champion, champ, metric)
        done = "not promoted" if refuse else "marked challenger"     # refused: nothing is written
        return Promotion(False, candidate, champion, score, None, f"v{candidate} {done}: {why}", outcome=INCOMPARABLE)
    if champion is None:
        return Promotion(True, candidate, None, score, None,
                         f"v{candidate} is the first champion ({metric} {score:.4g} under protocol {mine.key})",
                         outcome=PROMOTED, protocol=mine.key, compared=compared(mine, None))
    a, b = shared
    ours, theirs = a.scores[metric], b.scores[metric]
    ok = beats(ours, theirs, mode, min_improvement)
    margin = f", needs {min_improvement:+.1%}" if min_improvement else ""
    gain = improvement(ours, theirs, mode)
    numbers = f"{metric} {ours:.4g} vs {theirs:.4g} ({abs(gain):.2%} {'better' if gain > 0 else 'worse'}{margin})"
    why = (f"v{candidate} beats champion v{champion}: {numbers}; v{candidate} is champion" if ok else
           f"v{candidate} does not beat champion v{champion}: {numbers}; champion stays, v{candidate} is challenger")
    return Promotion(ok, candidate, champion, ours, theirs, why, table(candidate, a, champion, b, metric),
                     outcome=PROMOTED if ok else NOT_BETTER, protocol=a.key, compared=compared(a, b))


def _crown(client: MlflowClient, name: str, version: str, before: str | None, still_ours: Callable[[], None]) -> None:
    """Moves `champion` and appends to the history: alias first, so an interrupted move leaves
    the history ending on the champion before, where `rollback` returns to. The lock is checked
    before each write (see registry_lock)."""
    history = champion_history(client, name)
    if before is not None and history[-1:] != [before]:     # a champion from before the history was kept
        history.append(before)
    still_ours()
    client.set_registered_model_alias(name, CHAMPION, version)
    still_ours()
    client.set_registered_model_tag(name, TAG_CHAMPION_HISTORY, json.dumps(history + [version]))


def _log_comparison(client: MlflowClient, run_id: str | None, p: Promotion, champion: str | None) -> str | None:
    """The table and the decision as `promotion/<UTC time, ms>-v<candidate>-vs-v<champion>.txt` on the candidate's run."""
    if not run_id:
        return None
    now = time.time()
    stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z"
    path = f"promotion/{stamp}-v{p.candidate}-vs-v{champion}.txt"
    client.log_text(run_id, f"{p.table}\n\n{p.reason}\n", path)
    return path


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """The versions that were champion of `name`, oldest first, as moved by orbitgen (tag
    `orbitgen.champion_history`); the last one is the champion unless the alias was moved by
    hand. `previous_champion` says which one `rollback` returns to."""
    tags = client.get_registered_model(name).tags or {}
    return [str(v) for v in json.loads(tags.get(TAG_CHAMPION_HISTORY, "[]"))]


def previous_champion(client: MlflowClient, name: str) -> str | None:
    """The version `rollback` would make champion again (what `models show` marks), or None."""
    return _previous(champion_history(client, name), _champion(client, name), _versions(client, name))[0]


def _previous(history: list[str], champ, existing: set[str]) -> tuple[str | None, list[str]]:
    """(the previous champion, the history once it is champion again): the last earlier champion still registered."""
    h = [v for v in history if v in existing]
    if champ is not None and h[-1:] == [str(champ.version)]:
        h.pop()
    return (h[-1] if h else None), h


def rollback(name: str, client: MlflowClient | None = None) -> str:
    """Puts `champion` back on the previous champion and drops the current one from the history; says
    what it did. Raises `LockBusy` when another promotion holds the lock past the wait."""
    client = client or store_client()
    existing = _versions(client, name)
    if not existing:
        raise UserError(f"no registered model named {name!r}; {registered_names(client)}")
    if previous_champion(client, name) is None:     # checked before the lock too: a refusal writes nothing
        raise UserError(_no_previous(client, name))
    for attempt in range(LOCK_TRIES):
        try:
            with promotion_lock(client, name) as still_ours:
                champ = _champion(client, name)
                target, history = _previous(champion_history(client, name), champ, existing)
                if target is None:
                    raise UserError(_no_previous(client, name))
                still_ours()
                client.set_registered_model_alias(name, CHAMPION, target)
                still_ours()
                client.set_registered_model_tag(name, TAG_CHAMPION_HISTORY, json.dumps(history))
            break
        except LockLost:
            if attempt == LOCK_TRIES - 1:
                raise LockBusy(f"the promotion lock of {name!r} was taken over {LOCK_TRIES} times") from None
    was = f"v{champ.version}" if champ else "no champion"
    return f"rolled {name} back: champion {was} → v{target} (history {', '.join('v' + v for v in history)})"


def _no_previous(client: MlflowClient, name: str) -> str:
    champ = _champion(client, name)
    history = ", ".join("v" + v for v in champion_history(client, name)) or "empty"
    return (f"{name!r} has no previous champion to roll back to (champion "
            f"{'v' + str(champ.version) if champ else 'none'}; champion history: {history})")


def _versions(client: MlflowClient, name: str) -> set[str]:
    return {str(v.version) for v in client.search_model_versions(f"name='{name}'")}


def _best_version(name: str, versions: dict, metric: str, mode: str, client: MlflowClient) -> str:
    """The best version by `metric` under the protocol most versions were evaluated with (then the most samples)."""
    evals = {v: evaluations(client, mv) for v, mv in versions.items()}
    groups: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    for v, found in evals.items():
        for e in found:
            if e.protocol and metric in e.scores:
                groups.setdefault(e.key, {})[v] = e.scores[metric]
                samples[e.key] = e.protocol.num_samples
    if not groups:
        logged = sorted({m for found in evals.values() for e in found for m in e.scores})
        if metric not in logged:
            raise UserError(f"no version of {name!r} has the metric {metric!r}; its evaluations give: "
                            f"{', '.join(logged) or 'no metrics'}")
        raise UserError(f"no version of {name!r} has {metric} under a recorded evaluation protocol; name the "
                        f"candidate with --version, or evaluate: orbitgen eval models:/{name}/VERSION")
    scores = groups[max(groups, key=lambda k: (len(groups[k]), samples[k], k))]
    return (min if mode == "min" else max)(scores, key=scores.get)


def list_models(client: MlflowClient | None = None) -> list[dict]:
    client = client or store_client()
    return [{"name": m.name, "aliases": dict(m.aliases or {}),
             "latest": max((int(v.version) for v in client.search_model_versions(f"name='{m.name}'")), default=None)}
            for m in client.search_registered_models() if not is_lock(m)]


def _version(client: MlflowClient, name: str, given: str) -> str:
    """A version number, or an alias (`champion`, `@champion`) of `name`, as its version number."""
    if given.isdigit():
        return str(model_version(client, name, number=given).version)
    return str(model_version(client, name, alias=given.removeprefix("@")).version)


def describe_model(name: str, metric: str = "fid", client: MlflowClient | None = None) -> list[dict]:
    client = client or store_client()
    model = registered_model(client, name)
    aliases = {v: a for a, v in (model.aliases or {}).items()}
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        rows.append({"version": v.version, "alias": aliases.get(v.version, ""), "run_id": v.run_id,
                     metric: _score(client, v.run_id, metric), "source": v.source})
    return rows
