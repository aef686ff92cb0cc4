"""`orbitgen search`: MineAug augmentation searches on Ray Tune, their rankings in MLflow."""
from __future__ import annotations

import os

import click

from jobs.runtime import console
from jobs.cli.common import SET_HELP, VERBOSE_HELP, read_spec, say
from jobs.runtime.redact import redact


@click.group()
def search() -> None:
    """MineAug augmentation searches: score every candidate augmentation of the spec's data as
    parallel Ray Tune trials (MLflow child runs of one parent), optionally validate subsets by
    short trainings (Optuna), and write the spec back with the chosen list."""


@search.command("mineaug")
@click.argument("spec_path", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help=SET_HELP + " The search reads its settings from the spec's `search:` section, e.g. "
                              "--set search.k=3 --set search.validate.top_m=5.")
@click.option("--resume", metavar="NAME", help="Continue the interrupted search NAME (printed at its start): "
              "finished trials are not rerun and it logs into the same MLflow parent run.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Where to write the spec with augment.mineaug set [default: <workdir>/search/<name>/spec.yaml].")
@click.option("--spec-b64", hidden=True, help="The spec inline (used by `jobs submit --search`).")
@click.option("--verbose", "-v", is_flag=True, help=VERBOSE_HELP)
def search_mineaug(spec_path, overrides, resume, out, spec_b64, verbose) -> None:
    """Search the MineAug augmentations for the data of SPEC_PATH.

    Stage 1 applies every candidate (search.candidates) to every image, search.repeats times, and
    scores FID against the originals (the spec's eval.fid_extractor) and pixel MSE; drops
    near-identity ones (MSE <= search.mse_min) and near-duplicates; ranks single augmentations
    and every K-set. Stage 2 (search.validate.top_m > 0) trains the spec's family briefly on
    subsets proposed by Optuna and keeps the one whose generator is closest to the originals.
    Prints the ranking, the chosen list and the MLflow parent run; then run
    `orbitgen train <written spec>`. Bad input stops with exit code 2, naming the field.
    """
    from jobs.mineaug.run import run_search_job

    spec = read_spec(spec_path, overrides, spec_b64)
    console.set_verbose(verbose)
    log_file = console.library_lines_to_file(spec.workdir_path() / "logs")
    done = run_search_job(spec, say=say, resume=resume, out=out)   # bad input: exit 2 (BadInputExits2)
    res = done.result
    click.echo("")
    click.echo(res.table)
    click.echo("")
    click.echo(f"published choice (K best singles)  {', '.join(res.singles)}  (mixture FID {res.singles_fid:.4f})")
    click.echo(f"best K-set                         {', '.join(res.best_set)}  (mixture FID {res.best_set_fid:.4f})")
    click.echo(f"chosen ({res.select})  {', '.join(res.chosen)}")
    click.echo(f"  why        {res.reason}")
    click.echo(f"  mlflow     parent run {res.parent_run_id} (experiment {spec.experiment}) at {redact(done.tracking_uri)}")
    click.echo(f"  search     {res.name} (continue it with --resume {res.name}) · {res.seconds:.0f} s")
    click.echo(f"  next       orbitgen train {done.spec_path}")
    if log_file is not None and log_file.exists():
        click.echo(f"  logs       {log_file}; --verbose shows them here")


@search.command("show")
@click.argument("run_id")
@click.option("--tracking-uri", default=lambda: os.environ.get("MLFLOW_TRACKING_URI"),
              show_default="$MLFLOW_TRACKING_URI",
              help="Where the search was tracked (the spec's tracking.uri; for the embedded default "
                   "sqlite:///<workdir>/mlflow.db).")
@click.option("--workdir", default="orbitgen-work", show_default=True,
              help="Used when no tracking URI is given: the local store under it.")
def search_show(run_id, tracking_uri, workdir) -> None:
    """Print the ranking of the finished search whose MLflow parent run is RUN_ID."""
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from jobs.tracking.store_check import require_store
    from search.tracking import show_search

    uri = tracking_uri or f"sqlite:///{Path(workdir).absolute() / 'mlflow.db'}"
    require_store(uri, "--tracking-uri" if tracking_uri else "--workdir's store")
    try:
        click.echo(show_search(run_id, uri))
    except (LookupError, ValueError, MlflowException) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2)
