"""The MLflow model registry: log a generator as a pyfunc, register it, promote by metric, roll back.

`champion` moves only to a version that beats the current champion on a metric, both measured
under one evaluation protocol (`promotion`), by at least a margin; a version that does not is
marked `challenger`. Each move happens under the registered model's promotion lock
(`registry_lock`: MLflow has no compare-and-set) and appends to the model's champion history
(tag `orbitgen.champion_history`), which `rollback` walks back. Stages are deprecated in
MLflow: aliases only. `promote` returns its outcome (`PROMOTED`, `ALREADY_CHAMPION`,
`NOT_BETTER`, `INCOMPARABLE`, `LOCK_BUSY`) for the CLI's exit code and `--json`.

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
                return str(info.registered_model_version) if registered_name else None
            token = registration_token(run.info.run_id, snapshot, registered_name)
            found = retried(registered_version, MlflowClient(), registered_name, run.info.run_id, token)
            if found is not None:
                return found
            # The token goes on the run first: a retry after a lost answer looks for it (and the version).
            retried(mlflow.set_tag, TAG_REGISTRATION, token)
            model_uri = retried(_logged_model, snapshot, spec_file, family, signature, example, run, token)
            return retried(_register, model_uri, registered_name, run.info.run_id, token)


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
