"""Model references in a spec: a family that builds on another model (a frozen stage-1
generator, a ControlNet's base UNet) names it in a `model.*_from` key as a local snapshot path,
`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/generator`. The driver resolves
each to a local `generator.pt` before the spec reaches the workers, so `models/` stays free of
MLflow. That file is on the driver's disk: its bytes travel to the workers through Ray's object
store (`ship` on the driver, `place` on each worker), so workers on other nodes read it too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data_shards.errors import UserError
from jobs.runtime.env import tracking_uri_restored
from jobs.spec import JobSpec, SpecError
from jobs.tracking.store_check import require_store
from jobs.tracking.stores import registry_uri

SNAPSHOT_IN_MODEL = "artifacts/generator.pt"   # where log_generator puts the snapshot


def resolve_ref(ref: str, dest: Path, tracking_uri: str | None = None) -> str:
    """A local snapshot path for `ref`; `models:/` and `runs:/` refs are read from the MLflow
    store at `tracking_uri` (the spec's) and its registry (`stores.registry_uri`)."""
    if not ref.startswith(("models:/", "runs:/")):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no snapshot file at {ref}")
        return str(path.absolute())
    import mlflow.artifacts

    if tracking_uri:
        require_store(tracking_uri, "the spec's tracking store")
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # models:/ resolution opens a client of the *current* tracking URI besides the registry one:
    # without this, that is ./mlflow.db, created in whatever folder the command runs in.
    with tracking_uri_restored(), _use_tracking_uri(tracking_uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest),
                                                         tracking_uri=tracking_uri, registry_uri=registry_uri(tracking_uri)))
    snapshot = local / SNAPSHOT_IN_MODEL
    if not snapshot.is_file():
        raise FileNotFoundError(f"{ref} has no {SNAPSHOT_IN_MODEL}: not an orbitgen generator")
    return str(snapshot)


def resolve_model_refs(spec: JobSpec, dest: Path) -> JobSpec:
    """The spec with every `model.*_from` reference replaced by a local snapshot path."""
    from mlflow.exceptions import MlflowException

    model = dict(spec.model)
    for key, value in spec.model.items():
        if key.endswith("_from") and isinstance(value, str) and value:
            try:
                model[key] = resolve_ref(value, dest / key, tracking_uri=spec.tracking_uri())
            except (UserError, OSError, MlflowException) as e:   # no such file, store, model, version or run
                raise SpecError(f"model.{key}: cannot load {value!r}: {_first_line(e)}") from e
    return spec.model_copy(update={"model": model})


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _refs(spec: JobSpec) -> dict[str, str]:
    return {k: v for k, v in spec.model.items() if k.endswith("_from") and isinstance(v, str) and v}


def ship(spec: JobSpec) -> dict[str, Any]:
    """On the driver, after `resolve_model_refs`: each referenced file into Ray's object store."""
    import ray

    return {key: ray.put(Path(path).read_bytes()) for key, path in _refs(spec).items()}


def place(spec: JobSpec, shipped: dict[str, Any], dest: Path) -> JobSpec:
    """On a worker: the spec with each shipped file written under `dest` where this node lacks it."""
    import ray

    model = dict(spec.model)
    for key, path in _refs(spec).items():
        if key in shipped and not Path(path).is_file():
            local = dest / f"{key}.pt"
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_suffix(f".{os.getpid()}.tmp")   # workers of one node may race
                tmp.write_bytes(ray.get(shipped[key]))
                tmp.replace(local)
            model[key] = str(local)
    return spec.model_copy(update={"model": model})
