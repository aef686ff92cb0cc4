"""What the `orbitgen` command groups share: the error boundary, progress lines, option help.

The error boundary (`BadInputExits2`, the top-level group) gives every failure one of three ends:
- bad input (`UserError`, click's usage errors, a file refused by models/safe_load.py, a bucket
  that does not exist: like a missing path, a name the user gave that holds nothing): `error: ...`, exit 2;
- the environment (`EnvironmentProblem`: permissions, a full or read-only disk, credentials, an
  endpoint nobody answers; and the same errors raised raw by a library, recognised by their class
  and errno, never by their text): `error: ...`, exit 1;
- anything else is a bug: one line `internal error: <type>: <message>; the traceback is in <log
  file>; please report it`, exit 70 (EX_SOFTWARE), the traceback in that file only. The file is
  under $ORBITGEN_LOG_DIR, else `<temp dir>/orbitgen-errors-<uid>/`; ORBITGEN_TRACEBACK=1 also prints it.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback

import click

from data_shards.errors import EnvironmentProblem, UserError
from data_shards.storage import storage_problem
from jobs.runtime.redact import redact
from models.safe_load import UntrustedFileError
from jobs.spec import JobSpec, SpecError, decode_inline, load_spec, parse_spec

DEFAULT_WORKDIR = "orbitgen-work"  # also the default of the spec's `workdir`
SET_HELP = "Override any spec key, e.g. --set train.steps=20 --set scaling.num_workers=1 (repeatable)."
RESUME_HELP = ("Continue the stopped run RUN (the run name printed at its start, e.g. quickstart-1a2b3c4d) "
               "from its latest checkpoint under the spec's checkpoint storage, in the same MLflow run.")
VERBOSE_HELP = ("Show Ray's and MLflow's own lines and the workers' console output here too (else they go "
                "to the log file and Ray log folder printed at the end).")


EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERNAL = 2, 1, 70
LOG_DIR_ENV = "ORBITGEN_LOG_DIR"
TRACEBACK_ENV = "ORBITGEN_TRACEBACK"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(err: UserError | str) -> None:
    """Bad input: say why (the message names the input and what is allowed) and exit 2."""
    click.echo(f"error: {err}", err=True)
    sys.exit(EXIT_BAD_INPUT)


fail_spec = fail   # the name the command modules have used for spec errors


def fail_environment(err: EnvironmentProblem | str) -> None:
    """The environment stops the job: say what (the message names the thing and the fix) and exit 1."""
    click.echo(f"error: {_one_line(err)}", err=True)
    sys.exit(EXIT_ENVIRONMENT)


def error_log_dir() -> str:
    """Where internal errors leave their tracebacks: $ORBITGEN_LOG_DIR, else
    <temp dir>/orbitgen-errors-<uid> (one per user: a shared machine's /tmp is everyone's)."""
    return os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), f"orbitgen-errors-{os.getuid()}")


def _write_traceback(exc: BaseException) -> str | None:
    """The traceback of `exc` in a new file of `error_log_dir()`; its path, or None when no file
    could be written there (then the caller prints it instead: a bug must stay visible)."""
    try:
        folder = error_log_dir()
        os.makedirs(folder, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(folder, f"internal-error-{stamp}-{os.getpid()}.log")
        with open(path, "w") as f:
            # Redacted: a traceback may quote a URL with its password, and the file is kept.
            f.write(redact(f"orbitgen {' '.join(sys.argv[1:])}\n" + "".join(traceback.format_exception(exc))))
        return path
    except OSError:
        return None


def internal_error(exc: BaseException) -> None:
    """A bug: one line naming it and the log file that holds its traceback; exit 70."""
    path = _write_traceback(exc)
    message = redact(_one_line(exc))[:500]
    if path is None or os.environ.get(TRACEBACK_ENV):
        click.echo(redact("".join(traceback.format_exception(exc))).rstrip(), err=True)
    where = path or "the lines above (no log file could be written)"
    click.echo(f"internal error: {type(exc).__name__}: {message}; the traceback is in {where}; please report it",
               err=True)
    sys.exit(EXIT_INTERNAL)


def user_fixable(exc: BaseException) -> Exception | None:
    """A raw library error that the user's environment or input causes, as our own error: by its
    class, errno and S3 error code (a full, read-only or forbidden disk; botocore's missing
    credentials, unreachable endpoint, missing bucket, refused access), never by its text. The
    message names the file or bucket from the error itself. None: a bug."""
    return storage_problem(exc)


class BadInputExits2(click.Group):
    """The top-level group, the CLI's one error boundary (see the module's docstring): a
    `UserError` or click's usage error ends as `error: ...` and exit 2, an `EnvironmentProblem`
    (or a library's error of the same kind) as `error: ...` and exit 1, any other exception as
    one `internal error:` line, its traceback in a log file, and exit 70."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, UntrustedFileError) as e:   # a refused file is bad input too: its message names it
            fail(e)
        except EnvironmentProblem as e:
            fail_environment(e)
        except click.exceptions.NoArgsIsHelpError:
            raise   # a group called bare: its help, as click shows it
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            fail(f"{e.format_message()} (see {where} --help)")
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, BrokenPipeError):
            raise   # click's own ends (--help, ctrl-c, its error types) and a closed pipe: click handles them
        except Exception as e:
            mapped = user_fixable(e)
            if isinstance(mapped, UserError):
                fail(mapped)
            if isinstance(mapped, EnvironmentProblem):
                fail_environment(mapped)
            internal_error(e)


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
