"""Names inside archives (a StyleGAN zip, a shard's tar) that would escape the folder they are
read into: absolute paths and `..` parts. orbitgen extracts nothing, but keys and file names
come from these names, and a tool that does extract them would write outside its destination,
so such archives are refused whole, before anything is written."""
from __future__ import annotations

import re

from .errors import UserError

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeMemberName(UserError):
    """An archive member whose name is absolute or climbs out with `..`."""


def is_unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(_DRIVE.match(name)) or ".." in parts


def refuse_unsafe(names, archive: str) -> None:
    """Raise UnsafeMemberName naming the first offending members of `archive`."""
    bad = [n for n in names if is_unsafe(n)]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UnsafeMemberName(f"{archive}: member {shown} is absolute or contains '..' and would escape "
                               "the destination; allowed: relative names inside the archive")
