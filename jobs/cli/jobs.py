"""`orbitgen jobs`: submit specs to a Ray cluster as Ray jobs and follow them."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from jobs.cli.common import RESUME_HELP, SET_HELP, say
from jobs.spec import load_spec


@click.group()
def jobs() -> None:
    """Submit specs to a Ray cluster as Ray jobs and follow them.

    The cluster: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265.
    """


# No default here: the order lives in jobs/submit.py (resolve_address), shared with the library.
address_option = click.option(
    "--address", default=None, metavar="URL",
    help="The Ray dashboard / Jobs API address of the cluster's head (http://HEAD:8265). Unset: "
         "$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265. A GCS address "
         "(HEAD:6379, auto, ray://...) is resolved through the cluster.")


@jobs.command("submit")
@click.argument("spec_path", type=click.Path(dir_okay=False))
@address_option
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--wait/--no-wait", default=False, help="Follow the job's logs until it ends; exit 0 if it "
              "SUCCEEDED, else 1.")
@click.option("--resume", metavar="RUN", help=RESUME_HELP + " The run's storage must be one the cluster reads "
              "(checkpoint.storage on S3, or the head's local workdir). With --search: the search's name.")
@click.option("--search", "search", is_flag=True,
              help="Run the spec's MineAug search (`orbitgen search mineaug`) on the cluster instead of training it.")
@click.option("--env", "forward", multiple=True, metavar="NAME",
              help="Send this shell's $NAME to the job (repeatable), e.g. --env AWS_SECRET_ACCESS_KEY. Its value "
                   "is never printed, but whoever can list the cluster's jobs can read it.")
@click.option("--runtime-env-json", metavar="JSON",
              help="Merged into the job's runtime_env, e.g. '{\"pip\": [\"rich\"], \"env_vars\": {\"A\": \"1\"}}' "
                   "(env_vars key by key, excludes added to orbitgen's).")
@click.option("--working-dir", type=click.Path(file_okay=False), metavar="PATH",
              help="The folder shipped as the job's working_dir. Default: the project (orbitgen's pyproject.toml "
                   "or a .git) above SPEC_PATH, else above the current directory, else this orbitgen checkout; "
                   "never site-packages.")
@click.option("--entrypoint-num-gpus", type=click.FloatRange(min=0), metavar="N",
              help="GPUs reserved for the job's driver process (Ray's entrypoint_num_gpus).")
@click.option("--entrypoint-num-cpus", type=click.FloatRange(min=0), metavar="N",
              help="CPUs reserved for the job's driver process (Ray's entrypoint_num_cpus).")
def jobs_submit(spec_path, address, overrides, wait, resume, search, forward, runtime_env_json, working_dir,
                entrypoint_num_gpus, entrypoint_num_cpus) -> None:
    """Validate SPEC_PATH here, then run it on the cluster as a Ray job (the project folder as the
    job's working_dir; non-secret MLflow/S3 settings of this shell travel with it). Prints the job id.
    With --search the job is `orbitgen search mineaug` of the spec; its trials spread over the cluster.

    Credentials (AWS keys, MLflow passwords and tokens, URIs with user:password@) are not sent: the
    job reads them from the cluster nodes' own environment (instance profile, IRSA, a Kubernetes
    Secret), or --env NAME sends one; passwords in the spec's URIs are masked in the job's copy.
    """
    from jobs import submit

    spec = load_spec(spec_path, overrides)   # a bad spec: SpecError, exit 2 (BadInputExits2)
    prepared = submit.prepare(
        Path(spec_path).read_text(), working_dir=submit.working_dir_for(spec_path, working_dir),
        overrides=list(overrides), forward=forward, runtime_env_json=runtime_env_json, resume=resume,
        command="search" if search else "train", entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus)
    if not (spec.tracking.uri or prepared.runtime_env["env_vars"].get("MLFLOW_TRACKING_URI")):
        say("warning: no tracking.uri and no MLFLOW_TRACKING_URI sent: the job tracks into the nodes' "
            "MLFLOW_TRACKING_URI, else a local store on the cluster's head, under the spec's workdir")
    for note in prepared.notes:
        say(note)
    job_id = submit.send(prepared, address=address)
    click.echo(job_id)
    if wait:
        status = submit.wait(job_id, address=address, timeout_s=24 * 3600, on_log=lambda t: click.echo(t, nl=False, err=True))
        click.echo(status)
        sys.exit(0 if status == "SUCCEEDED" else 1)


@jobs.command("list")
@address_option
def jobs_list(address) -> None:
    """The cluster's jobs, newest first: id, status, start time, command (the inline spec left out)."""
    from jobs import submit

    for job in submit.list_jobs(address=address):
        click.echo(submit.job_line(job))


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
@click.option("--follow", "-f", is_flag=True, help="Stream new lines until the job ends.")
def jobs_logs(job_id, address, follow) -> None:
    """Print the job's logs so far (with --follow: until it ends)."""
    from jobs import submit

    if follow:
        status = submit.follow(job_id, address=address, on_log=lambda t: click.echo(t, nl=False))
        say(f"job {job_id}: {status}")
    else:
        click.echo(submit.logs(job_id, address=address), nl=False)


@jobs.command("stop")
@click.argument("job_id")
@address_option
def jobs_stop(job_id, address) -> None:
    """Ask the cluster to stop the job."""
    from jobs import submit

    click.echo("stop requested" if submit.stop(job_id, address=address) else "job had already ended")
