"""`orbitgen`: build shards, train job specs, search augmentations, follow Ray jobs, manage
registered models. One module per command group: train, data, models, jobs (and search)."""
from __future__ import annotations

import os

import click

from jobs.cli.common import BadInputExits2

# MLflow prints "View run ... at <tracking URI>" whenever a run ends, password included when the
# URI has one; orbitgen prints the run and the UI command itself (with the password masked).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@click.group(cls=BadInputExits2, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """orbitgen trains GANs and diffusion models for satellite and planetary imagery on Ray.

    Start with `orbitgen quickstart`; then `orbitgen train jobs/specs/<spec>.yaml`.
    """


def _add_commands() -> None:
    from jobs.cli.data import data
    from jobs.cli.doctor import doctor
    from jobs.cli.eval import eval_command
    from jobs.cli.jobs import jobs
    from jobs.cli.models import models
    from jobs.cli.search import search
    from jobs.cli.train import quickstart, train

    for command in (train, quickstart, search, data, models, eval_command, jobs, doctor):
        main.add_command(command)


_add_commands()
