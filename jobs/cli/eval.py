"""`orbitgen eval`: evaluate a registered model, a run's generator or a checkpoint on Ray workers."""
from __future__ import annotations

import os
from pathlib import Path

import click

from jobs.runtime import console
from jobs.cli.common import DEFAULT_WORKDIR, say
from jobs.runtime.redact import redact


def _metric_names(ctx, param, value: tuple[str, ...]) -> list[str] | None:
    """--metrics fid,kid and --metrics fid --metrics kid alike."""
    names = [n.strip() for v in value for n in v.split(",") if n.strip()]
    return names or None


@click.command("eval")
@click.argument("model")
@click.option("--data", "data_url", metavar="URL",
              help="Shard set to evaluate on (default: the data the model was trained on, from its spec).")
@click.option("--metrics", multiple=True, callback=_metric_names, metavar="NAMES",
              help="Metrics, comma-separated or repeated, among the family's (default: the spec's eval.metrics). "
                   "A family's perceptual metric is lpips with the spec's eval.lpips_weights, else perceptual_randconv "
                   "(without weights, either name asks for it).")
@click.option("--num-samples", type=int, metavar="N",
              help="Generated images (and at most as many reals) (default: the spec's eval.num_samples).")
@click.option("--workers", type=int, default=1, show_default=True, metavar="W",
              help="Ray workers, each with a disjoint seed range (or range of inputs) and an equal share of the "
                   "cluster's CPUs (torch runs a thread per whole CPU).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), metavar="G",
              help="GPUs each worker asks for (e.g. 1, or 0.5 to share one); 0 runs on the CPU. Refused at once on "
                   "a cluster that never has them. Default: an equal share of the cluster's GPUs, at most one "
                   "(none on a cluster without GPUs).")
@click.option("--tracking-uri", help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./{DEFAULT_WORKDIR}/mlflow.db).")
@click.option("--verbose", is_flag=True, help="Show Ray's lines and the workers' here.")
def eval_command(model, data_url, metrics, num_samples, workers, gpus_per_worker, tracking_uri, verbose) -> None:
    """Evaluate MODEL and record the values with their evaluation protocol.

    MODEL is models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a checkpoint folder or
    snapshot file (generator.pt). What is not given comes from the spec the model was trained
    with. The result equals a one-process evaluation of the same seeds, whatever W.

    The values are logged to an MLflow evaluation run in the model's experiment (tags
    orbitgen.eval_of, orbitgen.eval_protocol) and, for a registered version, onto the version
    keyed by protocol (data fingerprint and split, extractor and its weights' hash, sample count,
    seeds): `orbitgen models promote` compares only values under one protocol.

    \b
    Example:
      orbitgen eval models:/quickstart-dcgan@champion --num-samples 2000 --workers 2
    """
    from mlflow.tracking import MlflowClient

    from jobs.eval.model import evaluate_model
    from jobs.tracking.registry import write_model_card
    from jobs.tracking.runs import is_http, run_link, version_link

    console.set_verbose(verbose)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_WORKDIR).absolute() / 'mlflow.db'}"
    say(f"evaluating {model} on {workers} worker{'s' * (workers != 1)}")
    res = evaluate_model(model, tracking_uri=uri, data_url=data_url, metrics=metrics, num_samples=num_samples,
                         workers=workers, gpus_per_worker=gpus_per_worker)   # bad input: a UserError, exit 2 (jobs/cli/common.py)
    p = res.protocol
    for name, value in res.scores.items():
        click.echo(f"  {name:<10} {value:.6g}")
    extractors = ", ".join(f"{n} ({h})" for n, h in p.extractors.items()) or "none"
    click.echo(f"  protocol   {p.key()}: data {p.data_fingerprint[:12]} ({p.split}), {p.num_samples} sample{'s' * (p.num_samples != 1)}, "
               f"seeds {p.seed_base} (reals {p.real_seed}), extractors {extractors}")
    click.echo(f"  mlflow run {res.run_id} at {redact(uri)}")
    client = MlflowClient(uri)
    click.echo(f"  run page   {run_link(uri, client.get_run(res.run_id).info.experiment_id, res.run_id)}")
    if res.model_version:
        click.echo(f"  model      {res.model_name} v{res.model_version}: scores tagged under protocol {p.key()}")
        # The version's card shows its evaluations: this one too, from now on.
        write_model_card(client, res.model_name, res.model_version)
        if is_http(uri):
            click.echo(f"  model page {version_link(uri, res.model_name, res.model_version)}")
