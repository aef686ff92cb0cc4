"""Looking for credentials in what a job leaves behind: a secret may sit in a file as bytes, as hex
(Tune's JSON-embedded pickles) or as base64 at any alignment; MLflow records are read as text."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow.tracking import MlflowClient


def encodings(value: str) -> list[bytes]:
    """`value` as it may sit inside a file: raw, hex, base64 starting at any offset mod 3."""
    raw = value.encode()
    out = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + raw)
        out.append(enc[(pad * 4 + 2) // 3 + 1:-4])
    return out


def leaks(blob: bytes | str, secrets: Mapping[str, str]) -> list[str]:
    """The names of the `secrets` (name -> value) found in `blob`, in any of their encodings."""
    data = blob.encode("latin-1", errors="replace") if isinstance(blob, str) else blob
    return [name for name, value in secrets.items() if any(form in data for form in encodings(value))]


def mlflow_texts(client: MlflowClient, run_id: str, dest: Path) -> dict[str, str]:
    """Every record of an MLflow run as text (params, tags, metric names, artifacts), by where it came from."""
    run = client.get_run(run_id)
    out = {f"param {k}": f"{k}={v}" for k, v in run.data.params.items()}
    out |= {f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()}
    out |= {f"metric {k}": k for k in run.data.metrics}
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dest / run_id),
                                                     tracking_uri=client.tracking_uri))
    out |= {f"artifact {p.relative_to(local)}": p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()}
    return out
