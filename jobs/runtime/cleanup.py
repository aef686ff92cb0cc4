"""Bad input leaves nothing behind: folders a command creates while it checks what it was given
(built-in shards, downloaded model references under the workdir) go again when a check fails."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from data_shards.errors import UserError


@contextmanager
def removed_on_bad_input(*folders: Path) -> Iterator[None]:
    """On a UserError inside, remove each of `folders` that did not exist on entry (one that
    existed is the user's: it stays as it was, whatever the failed check added to it is not
    told apart from what was there)."""
    new = [Path(f) for f in folders if not Path(f).exists()]
    try:
        yield
    except UserError:
        for folder in new:
            shutil.rmtree(folder, ignore_errors=True)
        raise
