"""What the `orbitgen` command groups share: the bad-input exit, progress lines, option help."""
from __future__ import annotations

import sys

import click

from data_shards.errors import UserError
from jobs.spec import JobSpec, SpecError, decode_inline, load_spec, parse_spec

DEFAULT_WORKDIR = "orbitgen-work"  # also the default of the spec's `workdir`
SET_HELP = "Override any spec key, e.g. --set train.steps=20 --set scaling.num_workers=1 (repeatable)."
RESUME_HELP = ("Continue the stopped run RUN (the run name printed at its start, e.g. quickstart-1a2b3c4d) "
               "from its latest checkpoint under the spec's checkpoint storage, in the same MLflow run.")
VERBOSE_HELP = ("Show Ray's and MLflow's own lines and the workers' console output here too (else they go "
                "to the log file and Ray log folder printed at the end).")


def fail(err: UserError | str) -> None:
    """Bad input: say why (the message names the input and what is allowed) and exit 2."""
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


fail_spec = fail   # the name the command modules have used for spec errors


class BadInputExits2(click.Group):
    """The top-level group: a `UserError` from any command, or click's own usage error, ends
    as `error: ...` on stderr and exit code 2, nothing else. Any other exception is a bug and
    keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(e)
        except click.exceptions.NoArgsIsHelpError:
            raise   # a group called bare: its help, as click shows it
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            fail(f"{e.format_message()} (see {where} --help)")


def say(msg: str) -> None:
    click.echo(f"[orbitgen] {msg}", err=True)


def read_spec(spec_path: str | None, overrides, spec_b64: str | None) -> JobSpec:
    """The spec a command runs: from SPEC_PATH, or inline (`--spec-b64`, as `jobs submit` sends
    it); overrides applied; a bad spec exits 2 naming the field."""
    try:
        if spec_b64:
            return parse_spec(decode_inline(spec_b64), overrides, source="<submitted spec>")
        if spec_path:
            return load_spec(spec_path, overrides)
        raise click.UsageError("give a SPEC_PATH (ready ones: jobs/specs/*.yaml)")
    except SpecError as e:
        fail_spec(e)
