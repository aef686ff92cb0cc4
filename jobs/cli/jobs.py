"""`orbitgen jobs`: submit specs to a Ray cluster as Ray jobs and follow them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jobs.cli.common import RESUME_HELP, SET_HELP, say
from jobs.spec import load_spec


@click.group()
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
@click.option("--resume", metavar="RUN", help=RESUME_HELP + " The run's storage must be one the cluster reads "
              "(checkpoint.storage on S3, or the head's local workdir). With --search: the search's name.")
@click.option("--search", "search", is_flag=True,
              help="Run the spec's MineAug search (`orbitgen search mineaug`) on the cluster instead of training it.")
def jobs_submit(spec_path, address, overrides, wait, resume, search) -> None:
    """Validate SPEC_PATH here, then run it on the cluster as a Ray job (this repository as the
    job's working_dir; MLflow/S3 settings from this shell travel with it). Prints the job id.
    With --search the job is `orbitgen search mineaug` of the spec; its trials spread over the cluster."""
    from jobs import submit

    spec = load_spec(spec_path, overrides)   # a bad spec: SpecError, exit 2 (BadInputExits2)
    if not (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        say("warning: no tracking.uri and no MLFLOW_TRACKING_URI: the job tracks into a local store "
             "on the cluster's head, under the spec's workdir")
    job_id = submit.submit(Path(spec_path).read_text(), address=address, working_dir=str(Path(__file__).parents[2]),
                           overrides=list(overrides), resume=resume, command="search" if search else "train")
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
