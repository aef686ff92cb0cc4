"""The MLflow model registry: log a generator as a pyfunc, register it, promote by metric.

`champion` moves only to a version that beats the current champion on the spec's metric; a
version that does not is marked `challenger`. Stages are deprecated in MLflow: aliases only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from data_shards.errors import UserError
from jobs import console

REPO = Path(__file__).resolve().parents[2]
CHAMPION, CHALLENGER = "champion", "challenger"


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
    """Logs the snapshot as the active run's model `generator`; returns the registered version."""
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
        info = _log_model(snapshot, spec_file, family, signature, example, registered_name)
    return str(info.registered_model_version) if registered_name else None


def _log_model(snapshot, spec_file, family, signature, example, registered_name: str | None):
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
    )


@dataclass
class Promotion:
    promoted: bool
    candidate: str
    champion_before: str | None
    candidate_score: float | None
    champion_score: float | None
    reason: str


def _score(client: MlflowClient, run_id: str, metric: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(metric)
    return None if value is None or math.isnan(value) else value


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(name: str, *, metric: str, mode: str, candidate: str | None = None,
            client: MlflowClient | None = None) -> Promotion:
    """Moves `champion` to `candidate` (default: the best version by `metric`) if it beats the champion."""
    client = client or MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise UserError(f"no registered model named {name!r}; {_registered(client)}")
    scores = {str(v.version): _score(client, v.run_id, metric) for v in versions}
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    if candidate is None:
        scored = [v for v, s in scores.items() if s is not None]
        if not scored:
            logged = sorted({m for v in versions for m in _metrics(client, v.run_id)})
            raise UserError(f"no version of {name!r} has the metric {metric!r}; "
                            f"its runs log: {', '.join(logged) or 'no metrics'}")
        candidate = (min if mode == "min" else max)(scored, key=scores.get)
    candidate = _version(client, name, str(candidate), scores)
    champ = _champion(client, name)
    champ_version = str(champ.version) if champ else None
    cand_score = scores[candidate]
    champ_score = scores.get(champ_version)
    if cand_score is None:
        ok, why = False, f"v{candidate} has no {metric}"
    elif champ is None:
        ok, why = True, f"v{candidate} is the first champion ({metric} {cand_score:.4g})"
    elif champ_version == candidate:
        ok, why = False, f"v{candidate} already is the champion"
    elif champ_score is None or better(cand_score, champ_score):
        ok, why = True, f"v{candidate} beats champion v{champ_version} ({metric} {cand_score:.4g} vs {champ_score})"
    else:
        ok, why = False, (f"v{candidate} does not beat champion v{champ_version} "
                          f"({metric} {cand_score:.4g} vs {champ_score:.4g}); champion stays")
    if champ_version != candidate:
        client.set_registered_model_alias(name, CHAMPION if ok else CHALLENGER, candidate)
    return Promotion(ok, candidate, champ_version, cand_score, champ_score, why)


def list_models(client: MlflowClient | None = None) -> list[dict]:
    client = client or MlflowClient()
    return [{"name": m.name, "aliases": dict(m.aliases or {}),
             "latest": max((int(v.version) for v in client.search_model_versions(f"name='{m.name}'")), default=None)}
            for m in client.search_registered_models()]


def _registered(client: MlflowClient) -> str:
    names = [m.name for m in client.search_registered_models()]
    return f"registered: {', '.join(names)}" if names else "no model is registered in this store"


def _metrics(client: MlflowClient, run_id: str) -> list[str]:
    return list(client.get_run(run_id).data.metrics)


def _version(client: MlflowClient, name: str, given: str, scores: dict) -> str:
    """A version number, or an alias (`champion`, `@champion`) of `name`, as its version number."""
    if given.isdigit():
        if given not in scores:
            raise UserError(f"{name!r} has no version {given}; versions: {', '.join(sorted(scores, key=int))}")
        return given
    aliases = client.get_registered_model(name).aliases or {}
    alias = given.removeprefix("@")
    if alias not in aliases:
        raise UserError(f"{name!r} has no version or alias {given!r}; versions: "
                        f"{', '.join(sorted(scores, key=int))}; aliases: {', '.join(aliases) or 'none'}")
    return str(aliases[alias])


def describe_model(name: str, metric: str = "fid", client: MlflowClient | None = None) -> list[dict]:
    client = client or MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"no registered model named {name!r}; {_registered(client)}") from None
    aliases = {v: a for a, v in (model.aliases or {}).items()}
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        rows.append({"version": v.version, "alias": aliases.get(v.version, ""), "run_id": v.run_id,
                     metric: _score(client, v.run_id, metric), "source": v.source})
    return rows
