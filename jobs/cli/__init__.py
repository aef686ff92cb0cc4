"""`orbitgen`: build shards, train job specs, search augmentations, follow Ray jobs, manage
registered models. One module per command group: train, data, models, jobs (and search)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """orbitgen trains GANs and diffusion models for satellite and planetary imagery on Ray.

    Start with `orbitgen quickstart`; then `orbitgen train jobs/specs/<spec>.yaml`.
    """


def _add_commands() -> None:
    from jobs.cli.data import data
    from jobs.cli.jobs import jobs
    from jobs.cli.models import models
    from jobs.cli.search import search
    from jobs.cli.train import quickstart, train

    for command in (train, quickstart, search, data, models, jobs):
        main.add_command(command)


_add_commands()
