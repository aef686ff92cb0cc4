"""Sample keys from users' file names: any name a camera, a colleague or an archive gives a file
becomes a valid WebDataset key, and the name itself stays in the sample's `json` (`source`).

A key must be non-empty, hold no `.` (webdataset splits a member name at the first dot of its
base name) and not start with `_` (`__key__`-style names are metadata). Keys here are also
plain ASCII, so they survive shells, URLs and file systems that normalise Unicode differently:

    _DSC0001.png              -> DSC0001
    Été 2024/img.01.png       -> Ete_2024_img_01
    照片.png                  -> u7167u7247

Letters with accents lose them (NFKD), other non-ASCII characters become `uXXXX`, and every run
of anything else (spaces, dots, slashes, punctuation) becomes one `_`. Names that were already
keys (letters, digits, `_`, `-`, with `/` and `.` as separators) map as before. Two names that
map to one key are refused naming both (`unique_keys`): silently renaming one would make a
sample's key depend on listing order.
"""
from __future__ import annotations

import re
import unicodedata

from .errors import UserError

_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")
FALLBACK_KEY = "unnamed"


def _ascii(text: str) -> str:
    """NFKD splits accents from their letters (composed or not); the accents go, other
    non-ASCII characters become their code point."""
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        if ch.isascii():
            out.append(ch)
        elif not unicodedata.combining(ch):
            out.append(f"u{ord(ch):04x}")
    return "".join(out)


def key_from_path(rel: str) -> str:
    """A file's path relative to the source (extension dropped) -> its sample key."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return _NOT_KEY.sub("_", _ascii(stem)).lstrip("_") or FALLBACK_KEY


def unique_keys(rels: list[str], root: str) -> dict[str, str]:
    """key -> relative path for each file; a key two names map to is refused, naming both."""
    keys: dict[str, str] = {}
    for rel in rels:
        key = key_from_path(rel)
        if key in keys:
            raise UserError(f"{root}: {keys[key]!r} and {rel!r} both map to sample key {key!r}; "
                            "rename one of them")
        keys[key] = rel
    return keys
