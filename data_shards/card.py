"""The description of a shard set: `dataset.json` (the card) and `manifest.parquet` (one row a shard).

The manifest is written last: a manifest that reads whole means the set is complete (one cut
short by a crash or a full disk reads as an incomplete set, `IncompleteSet`). It stores shard
names relative to the set, so a set can be copied elsewhere (local -> S3) as is; `read_manifest`
returns full URLs. Every file here is written whole or not at all (`write_whole`).

A set made elsewhere (plain WebDataset tars, adopted by `adopt.py`) gets the same two files; its
card's `shards_url` says where the manifest's names are relative to when the card does not lie
beside the shards (a brace-expanded URL's card lies in a hidden folder beside them, see
`adopted_folder`; one that could not be written there, under the job's storage). A `dataset.json`
may name such a place itself: a set whose card points at shards elsewhere.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import uuid
from datetime import datetime, timezone
from importlib import metadata

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError

from .errors import InputNotFound, UserError
from .member_names import is_unsafe
from .storage import check_reachable, filesystem, join, storage_problem, to_url

CARD = "dataset.json"
MANIFEST = "manifest.parquet"
SKIPPED = "skipped.jsonl"  # what a build left out, one JSON object a line
NOTHING_THERE = "nothing there (no such folder or prefix); build a shard set with `orbitgen data build`"
NOT_A_SET = ("no dataset.json: not an orbitgen shard set (build one with `orbitgen data build`, or adopt plain "
             "WebDataset tars with `orbitgen data adopt URL`)")
NO_ADOPTED_CARD = "no card for these shards yet: write one with `orbitgen data adopt URL` (training on them does too)"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".tar"
ADOPTED_PREFIX = ".orbitgen-adopted-"   # the folder of an adopted set's card, beside its shards


class IncompleteSet(InputNotFound):
    """A set whose manifest is missing or does not read whole: a build that was cut short."""


def write_whole(fs, path: str, data: bytes) -> None:
    """`data` at `path`, all of it or nothing: readers never see a part. A local file is written
    under a temporary name in its folder and renamed into place (atomic on POSIX); on an object
    store one PUT is already all-or-nothing. On failure the temporary file goes."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data)
        except Exception as e:   # a missing bucket, no credentials, access denied: one line naming the file
            problem = storage_problem(e, fs.unstrip_protocol(path))
            if problem is None or problem is e:
                raise
            raise problem from e
        return
    folder, name = os.path.split(fs._strip_protocol(path))   # a file:// URL or a path
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.partial")
    # 0o666 less the umask, as a plain open() would make it (mkstemp's 0o600 would hide it from the group)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())   # the rename must not reach the disk before the bytes do
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        raise


def is_set_file(name: str) -> bool:
    """A file `data build` writes into a set (card, manifest, skipped list, shards)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base in (CARD, MANIFEST, SKIPPED) or (base.startswith(SHARD_PREFIX) and base.endswith(SHARD_SUFFIX))


def builder() -> str:
    try:
        return f"orbitgen {metadata.version('orbitgen')}"
    except metadata.PackageNotFoundError:  # running from a checkout that isn't installed
        return "orbitgen unknown"


class DatasetCard(BaseModel):
    layout: str                    # the source layout, e.g. "folder", "synthetic:craters"
    modalities: list[str]          # sample keys: "image", "cond", "mask", "cls", "json"
    resolution: int
    channels: int                  # of image and cond (mask: 1); PNG up to 4, .npy beyond
    count: int
    fingerprint: str               # sha256 over the shards' sha256 hex digests, in order
    shards: int
    source: str
    classes: list[str] | None = None  # names of the `cls` values, in order
    skipped: int = 0               # source items left out (--on-error skip); listed in skipped.jsonl
    # Adopted sets (adopt.py); absent from the cards of sets orbitgen wrote, which read as before.
    shards_url: str | None = None  # where the manifest's names are relative to, when not the card's folder
    resize: bool = False           # images of another size are fitted to `resolution` on read (data.resize)
    members: dict[str, list[str]] | None = None  # per modality, the member names found (e.g. image: [jpg])
    split: dict | None = None      # holdout (by key hash, split.py) when adopted: {holdout, training, held_out}
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    builder: str = Field(default_factory=builder)


def fingerprint(shard_sha256s: list[str]) -> str:
    h = hashlib.sha256()
    for s in shard_sha256s:
        h.update(s.encode("ascii"))
    return h.hexdigest()


def is_pattern(url: str) -> bool:
    """A brace-expanded shard URL (`s3://b/x/shard-{000000..000099}.tar`), not a set's folder."""
    return "{" in str(url)


def pattern_base(url: str) -> str:
    """The folder a brace pattern's shards lie under: its part before the first brace, up to a '/'."""
    return str(url).split("{", 1)[0].rsplit("/", 1)[0]


def adopted_folder(url: str, resize_to: int | None = None) -> str:
    """Where the card of the shards at `url` goes when written beside them: a folder of tars gets it
    in the folder itself; a brace pattern, or a view resized to `resize_to`, in a hidden folder
    beside the shards, named by a hash of what it describes (one card per pattern and size)."""
    url = to_url(str(url)).rstrip("/")   # the same folder whichever way the URL was written
    if not is_pattern(url) and resize_to is None:
        return url
    base = pattern_base(url) if is_pattern(url) else url
    described = url + (f"|resize={resize_to}" if resize_to is not None else "")
    return join(base, ADOPTED_PREFIX + hashlib.sha256(described.encode()).hexdigest()[:12])


def card_home(url: str) -> str:
    """The folder whose dataset.json describes `url`: a brace pattern's hidden card folder, else `url`."""
    return adopted_folder(url) if is_pattern(url) else url


def read_card(url: str) -> DatasetCard:
    check_reachable(url)
    fs, path = filesystem(card_home(url))
    try:
        with fs.open(join(path, CARD), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        why = NO_ADOPTED_CARD if is_pattern(url) else NOT_A_SET if fs.exists(path) else NOTHING_THERE
        raise InputNotFound(f"{url}: {why}") from None
    try:
        return DatasetCard.model_validate_json(text)
    except ValidationError as e:
        raise UserError(f"{url}: {CARD} is not an orbitgen card ({e.error_count()} problems, first: "
                        f"{'.'.join(map(str, e.errors()[0]['loc'])) or '(card)'}: {e.errors()[0]['msg']})") from None


def write_card(url: str, card: DatasetCard) -> None:
    fs, path = filesystem(url)
    write_whole(fs, join(path, CARD), card.model_dump_json(indent=2).encode())


def read_manifest(url: str) -> pd.DataFrame:
    """Columns url (full shard URL), samples, bytes, sha256; one row a shard, in order."""
    url = card_home(url)
    fs, path = filesystem(url)
    try:
        with fs.open(join(path, MANIFEST), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not fs.exists(join(path, CARD)):
            raise InputNotFound(f"{url}: {NOT_A_SET}") from None
        raise IncompleteSet(f"{url}: no {MANIFEST}: the shard set is incomplete "
                            "(interrupted build?); build it again") from None
    df = parse_manifest(raw, url)
    refuse_outside(df["url"], url)
    base = shards_base(url, read_card(url).shards_url)
    df["url"] = [join(base, u) for u in df["url"]]
    return df


def shards_base(url: str, shards_url: str | None) -> str:
    """The URL the manifest's shard names are relative to: the card's folder `url`, or the card's
    `shards_url` (a URL, an absolute path, or a path relative to the card's folder)."""
    if not shards_url:
        return to_url(url)
    if "://" in shards_url or os.path.isabs(shards_url):
        return to_url(shards_url).rstrip("/")
    protocol, _, path = to_url(url).partition("://")
    return f"{protocol}://{posixpath.normpath(posixpath.join(path, shards_url))}"


def parse_manifest(raw: bytes, url: str) -> pd.DataFrame:
    """The manifest's rows; `IncompleteSet` when the bytes are not a whole manifest (cut short)."""
    try:
        df = pq.read_table(io.BytesIO(raw)).to_pandas()
    except (pa.ArrowException, OSError) as e:   # a cut parquet file: no footer, "magic bytes", ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IncompleteSet(f"{url}: {MANIFEST} does not read whole ({len(raw)} bytes; {reason}): the shard set "
                            "is incomplete (a build cut short?); remove the folder and build it again") from None
    missing = {"url", "samples", "bytes", "sha256"} - set(df.columns)
    if missing:
        raise IncompleteSet(f"{url}: {MANIFEST} lacks the columns {', '.join(sorted(missing))}: not a manifest "
                            "`orbitgen data build` wrote; build the set again")
    return df


def complete_card(url: str) -> DatasetCard | None:
    """The card of the complete set at `url` (card and a manifest that reads whole), else None."""
    fs, path = filesystem(url)
    try:
        with fs.open(join(path, MANIFEST), "rb") as f:
            parse_manifest(f.read(), url)
        return read_card(url)
    except (FileNotFoundError, UserError):
        return None


def refuse_outside(names, url: str) -> None:
    """Shard names are relative to the set: a manifest naming a URL, an absolute path or a `..`
    part would make readers fetch (and `data verify` bless) files outside the set."""
    bad = [n for n in names if "://" in n or is_unsafe(n)]
    if bad:
        raise UserError(f"{join(url, MANIFEST)}: shard {bad[0]!r} is outside the set; allowed: names relative "
                        "to the set, as `orbitgen data build` writes them")


def write_manifest(url: str, rows: list[dict]) -> None:
    """rows: {"url": shard name relative to the set, "samples", "bytes", "sha256"}."""
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("url", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = filesystem(url)
    write_whole(fs, join(path, MANIFEST), buf.getvalue())
