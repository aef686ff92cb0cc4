"""Names of archive members: which part of a sample a shard member holds (`png`, `cond.png`,
`cls`, ...: `part_names`), and which names are unsafe.

Unsafe: names inside archives (a StyleGAN zip, a shard's tar) that would escape the folder they are
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


# --- Which tar members hold which part of a sample -------------------------------------------
# WebDataset names a member `KEY.EXT`; readers (webdataset's decoders, Ray Data) key a sample's
# parts by EXT. The common spellings are `png`, `jpg`, `cls`, `json`; orbitgen's shards before
# the common names used `image.png` / `image.npy`, which still read. Pairs keep a prefix:
# `cond.png` (the input) and `mask.png` (its validity mask), as webdataset sets commonly do
# for several images per sample.

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "npy")   # npy: beyond 4 bands
OLD_IMAGE_PREFIX = "image"   # orbitgen's shards before the common names: `image.png`, `image.npy`


def part_names(modality: str) -> tuple[str, ...]:
    """The member extensions that may hold `modality`, in the order they are tried: for `image`
    the bare common extensions, then orbitgen's old `image.*`; for `cond` / `mask` the prefixed
    ones; `cls` and `json` are their own names."""
    if modality == "image":
        return IMAGE_EXTENSIONS + tuple(f"{OLD_IMAGE_PREFIX}.{e}" for e in IMAGE_EXTENSIONS)
    if modality in ("cond", "mask"):
        return tuple(f"{modality}.{e}" for e in IMAGE_EXTENSIONS)
    return (modality,)


def find_part(raw: dict, modality: str) -> str | None:
    """The member of the raw sample `raw` (ext -> bytes) that holds `modality`, else None."""
    return next((name for name in part_names(modality) if name in raw), None)


def written_name(modality: str, extension: str) -> str:
    """The member name orbitgen writes: `png` / `npy` for the image, `cond.png`, `mask.png`."""
    return extension if modality == "image" else f"{modality}.{extension}"


def image_extension_of(part: str) -> str:
    """`jpg` of `jpg`, `cond.jpg` or `image.jpg`."""
    return part.rsplit(".", 1)[-1].lower()
