"""`orbitgen doctor`: check the environment a job spec will run in."""
from __future__ import annotations

import sys

import click

from jobs.cli.common import SET_HELP
from jobs.spec import SPECS_DIR, load_spec


@click.command()
@click.argument("spec_path", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def doctor(spec_path, overrides) -> None:
    """Check what SPEC_PATH (default: the quickstart's spec) will need before it runs: Ray (local
    CPUs, or the cluster RAY_ADDRESS names), GPUs, the tracking server, run storage (a file written
    and read back), the training data, and the local files the spec names. Prints each check and,
    for what is wrong, how to fix it; exit code 1 when something is wrong. Nothing is started."""
    from jobs.doctor import diagnose

    spec = load_spec(spec_path or SPECS_DIR / "quickstart.yaml", list(overrides))
    wrong = 0
    for check in diagnose(spec):
        click.echo(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name:<9} {check.detail}")
        if not check.ok:
            wrong += 1
            click.echo(f"        {'':<9} fix: {check.fix}")
    click.echo(f"{wrong} problem(s) found" if wrong else "all checks passed")
    sys.exit(1 if wrong else 0)
