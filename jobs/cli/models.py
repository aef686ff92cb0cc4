"""`orbitgen models`: registered generators in the MLflow model registry."""
from __future__ import annotations

import os
from pathlib import Path

import click

from jobs.cli.common import DEFAULT_WORKDIR


def _client(uri: str | None):
    """A client of the store the user named, once it is known to be there (reading never creates one)."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.store_check import require_store

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_WORKDIR).absolute() / 'mlflow.db'}"
    require_store(uri, "--tracking-uri")
    return MlflowClient(uri)


tracking_option = click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                                     f"else ./{DEFAULT_WORKDIR}/mlflow.db).")


@click.group()
def models() -> None:
    """Registered generators in the MLflow model registry."""


@models.command("list")
@tracking_option
def models_list(tracking_uri) -> None:
    """List registered models with their aliases."""
    from jobs.tracking.registry import list_models

    for m in list_models(_client(tracking_uri)):
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "no aliases"
        click.echo(f"{m['name']}  latest v{m['latest']}  {aliases}")


@models.command("show")
@click.argument("name")
@click.option("--metric", default="fid", show_default=True)
@tracking_option
def models_show(name, metric, tracking_uri) -> None:
    """Every version of NAME with its alias, run and METRIC."""
    from jobs.tracking.registry import describe_model

    rows = describe_model(name, metric, _client(tracking_uri))
    for r in rows:
        click.echo(f"v{r['version']:<4} {r['alias']:<10} {metric}={r[metric]}  run {r['run_id']}")


@models.command("promote")
@click.argument("name")
@click.option("--metric", default="fid", show_default=True, help="Run metric that decides.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--version", help="Candidate version, a number or an alias (default: the best version by METRIC).")
@tracking_option
def models_promote(name, metric, mode, version, tracking_uri) -> None:
    """Move alias `champion` of NAME to the best version, only if it beats the current champion."""
    from jobs.tracking.registry import promote

    p = promote(name, metric=metric, mode=mode, candidate=version, client=_client(tracking_uri))
    click.echo(p.reason)
