"""`orbitgen train` and `orbitgen quickstart`: run a job spec on Ray and report where everything went."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from jobs.runtime import console
from jobs.cli.common import DEFAULT_WORKDIR, RESUME_HELP, SET_HELP, VERBOSE_HELP, read_spec, say
from jobs.runtime.redact import redact
from jobs.spec import SPECS_DIR, load_spec


def _run_and_report(spec, resume: str | None, verbose: bool, check_learning: bool = False) -> None:
    from jobs.tracking.runs import is_http, run_link, version_link
    from jobs.train.driver import run_job

    console.set_verbose(verbose)
    logs = spec.workdir_path() / "logs"
    log_file = console.library_lines_to_file(logs)
    res = run_job(spec, say=say, resume=resume)   # bad input: a UserError, exit 2 (jobs/cli/common.py)
    ray_logs = None if verbose else console.link_ray_logs(logs)
    fid = res.metrics.get("fid")
    # (it logs into the run: not while the tracking server is away)
    check = (_check_learning(spec, res) if check_learning and res.checkpoint
             and not res.extra.get("tracking_unfinished") else None)
    click.echo("")
    click.echo(f"done in {res.seconds:.0f} s")
    click.echo(f"  shards       {res.data_url}")
    click.echo(f"  run          {res.run_name} (continue it with --resume {res.run_name})")
    click.echo(f"  checkpoints  {res.checkpoint or res.storage}")
    click.echo(f"  mlflow run   {res.run_id} (experiment {spec.experiment}) at {redact(res.tracking_uri)}")
    click.echo(f"  run page     {run_link(res.tracking_uri, res.experiment_id, res.run_id)}")
    if fid is not None:
        click.echo(f"  fid          {fid:.4f} (extractor {spec.eval.fid_extractor})")
    if check is not None:
        if check.ratio() is not None:
            click.echo(f"  untrained    fid {check.untrained['fid']:.4f}, same extractor and seeds: "
                       f"trained / untrained = {check.ratio():.3f}")
        click.echo(f"  samples      {check.picture} (reals left, samples right; also in the MLflow run's samples/)")
    if res.model_version:
        click.echo(f"  model        models:/{spec.tracking.registry_model}/{res.model_version} — {res.promotion.reason}")
        click.echo(f"               load it: mlflow.pyfunc.load_model('models:/{spec.tracking.registry_model}@champion')")
        if is_http(res.tracking_uri):   # a local store: the run page line already gave the `mlflow ui` command
            click.echo(f"  model page   {version_link(res.tracking_uri, spec.tracking.registry_model, res.model_version)}")
    if log_file is not None and log_file.exists():
        click.echo(f"  logs         {log_file}" + (f" (workers: {ray_logs})" if ray_logs else "") + "; --verbose shows them here")
    if res.extra.get("tracking_unfinished"):
        # Trained and kept, but the tracking server stayed away (its line says what to run later):
        # neither bad input (2) nor a crash (1).
        sys.exit(3)


def _check_learning(spec, res):
    """The untrained generator's FID and a picture of reals beside samples, logged into the run."""
    from mlflow.tracking import MlflowClient

    from jobs.eval.learning import check_run
    from jobs.train.loop import GRID_SEED   # the seed of the sample grids the run logged

    picture = spec.workdir_path() / "samples" / f"{res.run_name}-reals-vs-samples.png"
    check = check_run(spec, data_url=res.data_url, checkpoint=res.checkpoint, trained=res.metrics,
                      picture=picture, grid_seed=GRID_SEED)
    client = MlflowClient(res.tracking_uri)
    client.log_artifact(res.run_id, str(check.picture), "samples")
    for name, value in check.untrained.items():
        client.log_metric(res.run_id, f"{name}_untrained", value)
    return check


@click.command()
@click.argument("spec_path", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", metavar="RUN", help=RESUME_HELP)
@click.option("--spec-b64", hidden=True, help="The spec inline (used by `jobs submit`).")
@click.option("--verbose", "-v", is_flag=True, help=VERBOSE_HELP)
def train(spec_path, overrides, resume, spec_b64, verbose) -> None:
    """Train the job spec SPEC_PATH on the local Ray (or the cluster RAY_ADDRESS names).

    The spec is validated first: a bad key or value stops here with exit code 2, naming the
    field. Storage and tracking come from the spec, else MLFLOW_TRACKING_URI /
    AWS_ENDPOINT_URL / AWS credentials, else local folders under the spec's workdir. An MLflow
    server that goes away is waited for (ORBITGEN_TRACKING_RETRY_S, default 300 s, after training);
    if it stays away, the checkpoint is kept, a line says how to finish later, and the exit code is 3.
    """
    spec = read_spec(spec_path, overrides, spec_b64)
    _run_and_report(spec, resume, verbose)


@click.command()
@click.option("--workdir", default=DEFAULT_WORKDIR, show_default=True, type=click.Path(file_okay=False),
              help="Everything goes here: built-in shards, run storage, the MLflow store and registry.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", metavar="RUN", help=RESUME_HELP)
@click.option("--verbose", "-v", is_flag=True, help=VERBOSE_HELP)
def quickstart(workdir, overrides, resume, verbose) -> None:
    """The embedded default, one command: built-in crater images → shards → DCGAN on 2 CPU
    workers (Ray Train, DDP/gloo) → MLflow run with FID → registered model, promoted to
    `champion` if it beats the current one. Ends with the untrained generator's FID beside the
    trained one's and a picture of real images beside samples. Takes two to three minutes on 2 cores."""
    spec = load_spec(SPECS_DIR / "quickstart.yaml", [f"workdir={Path(workdir).absolute()}", *overrides])
    _run_and_report(spec, resume, verbose, check_learning=True)
