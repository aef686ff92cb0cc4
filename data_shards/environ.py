"""Environment variables set for one block of code and put back after it. Here, below `jobs` and
`search`, so that both use one copy (docs/ARCHITECTURE.md: `search` never imports `jobs`)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def environ_set(values: dict[str, str]) -> Iterator[None]:
    """`values` in the environment for a block; only those variables are put back after it (as
    they were, or absent), so what other code sets meanwhile stays."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
