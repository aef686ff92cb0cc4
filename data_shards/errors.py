"""`UserError`: what the user gave (a spec field, a path, a URL, a name) cannot be used.

It sits here, at the bottom of the import graph, because every package raises it: data_shards
for sources and shard sets, search for its settings, jobs for specs, runs and registry names.
The CLI prints its message as `error: ...` (one or two lines naming the input and what is
allowed) and exits 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message names it and says what is allowed."""


class InputNotFound(UserError, FileNotFoundError):
    """A path or URL the user named holds nothing (still a FileNotFoundError for callers that catch that)."""


class InputExists(UserError, FileExistsError):
    """The destination the user named already holds something else."""
