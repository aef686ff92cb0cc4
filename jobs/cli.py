"""`orbitgen`: build shards, train job specs, follow Ray jobs, manage registered models."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from jobs.spec import SPECS_DIR, SpecError, decode_inline, load_spec, parse_spec

DEFAULT_WORKDIR = "orbitgen-work"
SET_HELP = "Override any spec key, e.g. --set train.steps=20 --set scaling.num_workers=1 (repeatable)."


def _fail_spec(err: SpecError) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


def _say(msg: str) -> None:
    click.echo(f"[orbitgen] {msg}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """orbitgen trains GANs and diffusion models for satellite and planetary imagery on Ray.

    Start with `orbitgen quickstart`; then `orbitgen train jobs/specs/<spec>.yaml`.
    """


# --------------------------------------------------------------------------- train / quickstart
def _run_and_report(spec) -> None:
    from jobs.runner import run_job

    res = run_job(spec, say=_say)
    fid = res.metrics.get("fid")
    click.echo("")
    click.echo(f"done in {res.seconds:.0f} s")
    click.echo(f"  shards       {res.data_url}")
    click.echo(f"  checkpoints  {res.checkpoint or res.storage}")
    click.echo(f"  mlflow run   {res.run_id} (experiment {spec.experiment}) at {res.tracking_uri}")
    if fid is not None:
        click.echo(f"  fid          {fid:.4f} (extractor {spec.eval.fid_extractor})")
    if res.model_version:
        click.echo(f"  model        models:/{spec.tracking.registry_model}/{res.model_version} — {res.promotion.reason}")
        click.echo(f"               load it: mlflow.pyfunc.load_model('models:/{spec.tracking.registry_model}@champion')")
    if res.tracking_uri.startswith("sqlite:"):
        click.echo(f"  open the UI  mlflow ui --backend-store-uri {res.tracking_uri} --port 5000")


@main.command()
@click.argument("spec_path", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--spec-b64", hidden=True, help="The spec inline (used by `jobs submit`).")
def train(spec_path, overrides, spec_b64) -> None:
    """Train the job spec SPEC_PATH on the local Ray (or the cluster RAY_ADDRESS names).

    The spec is validated first: a bad key or value stops here with exit code 2, naming the
    field. Storage and tracking come from the spec, else MLFLOW_TRACKING_URI /
    AWS_ENDPOINT_URL / AWS credentials, else local folders under the spec's workdir.
    """
    try:
        if spec_b64:
            spec = parse_spec(decode_inline(spec_b64), overrides, source="<submitted spec>")
        elif spec_path:
            spec = load_spec(spec_path, overrides)
        else:
            raise click.UsageError("give a SPEC_PATH (ready ones: jobs/specs/*.yaml)")
    except SpecError as e:
        _fail_spec(e)
    _run_and_report(spec)


@main.command()
@click.option("--workdir", default=DEFAULT_WORKDIR, show_default=True, type=click.Path(file_okay=False),
              help="Everything goes here: built-in shards, run storage, the MLflow store and registry.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def quickstart(workdir, overrides) -> None:
    """The embedded default, one command: built-in crater images → shards → DCGAN on 2 CPU
    workers (Ray Train, DDP/gloo) → MLflow run with FID → registered model, promoted to
    `champion` if it beats the current one. Takes a few minutes on 2 cores."""
    try:
        spec = load_spec(SPECS_DIR / "quickstart.yaml", [f"workdir={Path(workdir).absolute()}", *overrides])
    except SpecError as e:
        _fail_spec(e)
    _run_and_report(spec)


# --------------------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Build WebDataset shards from a source layout and look at them."""


@data.command("build")
@click.argument("source")
@click.argument("dest")
@click.option("--layout", type=click.Choice(["folder"]), default="folder", show_default=True,
              help="How SOURCE is laid out: `folder` = images at any depth.")
@click.option("--resolution", type=int, required=True, help="Square side: resize the shorter side, centre-crop.")
@click.option("--channels", type=click.Choice(["keep", "1", "3"]), default="keep", show_default=True,
              help="Keep the source's channels, or convert to gray (1) / RGB (3).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard.")
def data_build(source, dest, layout, resolution, channels, shard_size) -> None:
    """Write the images under SOURCE as shards to DEST (a folder or an fsspec URL: file://, s3://).

    DEST gets shard-NNNNNN.tar, dataset.json (the card) and manifest.parquet, written last:
    a failed build never looks complete.
    """
    import itertools

    from data_shards.sources import read_folder
    from data_shards.storage import to_url
    from data_shards.writer import write_shards

    ch = None if channels == "keep" else int(channels)
    samples = read_folder(source, resolution, ch)
    try:
        first = next(samples)
    except StopIteration:
        raise click.ClickException(f"no images under {source}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        card = write_shards(itertools.chain([first], samples), to_url(dest), layout=layout, resolution=resolution,
                            channels=first.image.shape[-1], source=str(Path(source).absolute()), shard_samples=shard_size)
    except (ValueError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{card.count} images in {card.shards} shards → {to_url(dest)} (fingerprint {card.fingerprint[:12]})")


@data.command("inspect")
@click.argument("dest")
@click.option("--preview", type=click.Path(dir_okay=False), help="Also write a PNG grid of the first samples here.")
def data_inspect(dest, preview) -> None:
    """Print the card and per-shard counts of the shard set DEST."""
    from data_shards.preview import describe, save_preview
    from data_shards.storage import to_url

    try:
        click.echo(describe(to_url(dest)))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if preview:
        click.echo(f"preview → {save_preview(to_url(dest), preview)}")


# --------------------------------------------------------------------------- models
def _tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_WORKDIR).absolute() / 'mlflow.db'}"


tracking_option = click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                                     f"else ./{DEFAULT_WORKDIR}/mlflow.db).")


@main.group()
def models() -> None:
    """Registered generators in the MLflow model registry."""


@models.command("list")
@tracking_option
def models_list(tracking_uri) -> None:
    """List registered models with their aliases."""
    from mlflow.tracking import MlflowClient

    from jobs.registry import list_models

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

    from jobs.registry import describe_model

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

    from jobs.registry import promote

    try:
        p = promote(name, metric=metric, mode=mode, candidate=version, client=MlflowClient(_tracking_uri(tracking_uri)))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(p.reason)


# --------------------------------------------------------------------------- jobs
@main.group()
def jobs() -> None:
    """Submit specs to a Ray cluster as Ray jobs and follow them."""


address_option = click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                              show_default="$RAY_ADDRESS or http://127.0.0.1:8265",
                              help="The Ray dashboard / Jobs API address of the cluster's head.")


@jobs.command("submit")
@click.argument("spec_path", type=click.Path(dir_okay=False))
@address_option
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--wait/--no-wait", default=False, help="Follow the job's logs until it ends.")
def jobs_submit(spec_path, address, overrides, wait) -> None:
    """Validate SPEC_PATH here, then run it on the cluster as a Ray job (this repository as the
    job's working_dir; MLflow/S3 settings from this shell travel with it). Prints the job id."""
    from jobs import submit

    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as e:
        _fail_spec(e)
    if not (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        _say("warning: no tracking.uri and no MLFLOW_TRACKING_URI: the job tracks into a local store "
             "on the cluster's head, under the spec's workdir")
    job_id = submit.submit(Path(spec_path).read_text(), address=address, working_dir=str(Path(__file__).parents[1]),
                           overrides=list(overrides))
    click.echo(job_id)
    if wait:
        status = submit.wait(job_id, address=address, timeout_s=24 * 3600, on_log=lambda t: click.echo(t, nl=False, err=True))
        click.echo(status)
        sys.exit(0 if status == "SUCCEEDED" else 1)


@jobs.command("status")
@click.argument("job_id")
@address_option
def jobs_status(job_id, address) -> None:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from jobs import submit

    click.echo(submit.status(job_id, address=address))


@jobs.command("logs")
@click.argument("job_id")
@address_option
def jobs_logs(job_id, address) -> None:
    """Print the job's logs so far."""
    from jobs import submit

    click.echo(submit.logs(job_id, address=address), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@address_option
def jobs_stop(job_id, address) -> None:
    """Ask the cluster to stop the job."""
    from jobs import submit

    click.echo("stop requested" if submit.stop(job_id, address=address) else "job had already ended")


if __name__ == "__main__":
    main()
