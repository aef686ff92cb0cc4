"""`orbitgen models`: registered generators in the MLflow model registry."""
from __future__ import annotations

import os
from pathlib import Path

import click

from jobs.cli.common import DEFAULT_WORKDIR


def _tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_WORKDIR).absolute() / 'mlflow.db'}"


tracking_option = click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                                     f"else ./{DEFAULT_WORKDIR}/mlflow.db).")


@click.group()
def models() -> None:
    """Registered generators in the MLflow model registry."""


@models.command("list")
@tracking_option
def models_list(tracking_uri) -> None:
    """List registered models with their aliases."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.registry import list_models

    for m in list_models(MlflowClient(_tracking_uri(tracking_uri))):
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "no aliases"
        click.echo(f"{m['name']}  latest v{m['latest']}  {aliases}")


@models.command("show")
@click.argument("name")
@click.option("--metric", default="fid", show_default=True)
@tracking_option
def models_show(name, metric, tracking_uri) -> None:
    """Every version of NAME with its alias, run and METRIC."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.registry import describe_model

    try:
        rows = describe_model(name, metric, MlflowClient(_tracking_uri(tracking_uri)))
    except Exception as e:  # MlflowException for an unknown name
        raise click.ClickException(f"{name}: {e}") from None
    for r in rows:
        click.echo(f"v{r['version']:<4} {r['alias']:<10} {metric}={r[metric]}  run {r['run_id']}")


@models.command("promote")
@click.argument("name")
@click.option("--metric", default="fid", show_default=True, help="Run metric that decides.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--version", help="Candidate version (default: the best version by METRIC).")
@tracking_option
def models_promote(name, metric, mode, version, tracking_uri) -> None:
    """Move alias `champion` of NAME to the best version, only if it beats the current champion."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.registry import promote

    try:
        p = promote(name, metric=metric, mode=mode, candidate=version, client=MlflowClient(_tracking_uri(tracking_uri)))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(p.reason)
