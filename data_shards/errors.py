"""`UserError` and `EnvironmentProblem`: the two kinds of failure a user can fix.

- `UserError`: what the user gave (a spec field, a path, a URL, a name) cannot be used. The CLI
  prints its message as `error: ...` (one or two lines naming the input and what is allowed)
  and exits 2.
- `EnvironmentProblem`: the input is right but the machine or a service around it stops the job
  (a folder the user may not write, a full disk, a read-only file system, missing credentials,
  an endpoint nobody answers). The CLI prints `error: ...` and exits 1.

Anything else is a bug: the CLI prints one `internal error:` line, keeps the traceback in a log
file and exits 70 (jobs/cli/common.py).

They sit here, at the bottom of the import graph, because every package raises them: data_shards
for sources and shard sets, search for its settings, jobs for specs, runs and registry names.
`environment_problem` turns an OSError of the disk (EACCES, EPERM, EROFS, ENOSPC, EDQUOT) into
an `EnvironmentProblem` that names the file and the fix; callers use it where they write.
"""
from __future__ import annotations

import errno


class UserError(ValueError):
    """Bad input; the message names it and says what is allowed."""


class InputNotFound(UserError, FileNotFoundError):
    """A path or URL the user named holds nothing (still a FileNotFoundError for callers that catch that)."""


class InputExists(UserError, FileExistsError):
    """The destination the user named already holds something else."""


class EnvironmentProblem(OSError):
    """The environment stops the job (permissions, disk space, credentials, network); the message
    names the thing (file, bucket, endpoint) and the fix. Still an OSError, so code that catches
    OSError to clean up keeps doing so."""

    def __init__(self, message: str):
        super().__init__(message)   # one argument: str() is the message, no "[Errno n]"


# errno -> (what happened, what to do); only what the user's environment decides, never a bug.
_DISK_FIXES = {
    errno.EACCES: ("permission denied", "choose a folder you can write, or ask its owner for write permission"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write, or ask its owner for write permission"),
    errno.EROFS: ("read-only file system", "choose a destination on a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free space there or choose a destination with more room"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or choose another destination"),
}


def environment_problem(exc: BaseException, what: str | None = None) -> EnvironmentProblem | None:
    """`exc` as an EnvironmentProblem naming the file (else `what`) and the fix, when it is an
    OSError of the disk that the user's environment causes; None for anything else."""
    if isinstance(exc, EnvironmentProblem):
        return exc
    if not isinstance(exc, OSError) or exc.errno not in _DISK_FIXES:
        return None
    happened, fix = _DISK_FIXES[exc.errno]
    if exc.filename is not None:
        return EnvironmentProblem(f"{exc.filename}: {happened}; {fix}")
    said = exc.strerror or happened   # a writer's own message when it raised one (it names the file)
    return EnvironmentProblem(f"{what}: {said}; {fix}" if what else f"{said}; {fix}")
