"""The description of a shard set: `dataset.json` (the card) and `manifest.parquet` (one row a shard).

The manifest is written last: its presence means the set is complete. It stores shard names
relative to the set, so a set can be copied elsewhere (local -> S3) as is; `read_manifest`
returns full URLs.
"""
from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from importlib import metadata

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError

from .errors import InputNotFound, UserError
from .member_names import is_unsafe
from .storage import check_reachable, filesystem, join, to_url

CARD = "dataset.json"
MANIFEST = "manifest.parquet"
SKIPPED = "skipped.jsonl"  # what a build left out, one JSON object a line
NOTHING_THERE = "nothing there (no such folder or prefix); build a shard set with `orbitgen data build`"
NOT_A_SET = "no dataset.json: not an orbitgen shard set (build one with `orbitgen data build`)"


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
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    builder: str = Field(default_factory=builder)


def fingerprint(shard_sha256s: list[str]) -> str:
    h = hashlib.sha256()
    for s in shard_sha256s:
        h.update(s.encode("ascii"))
    return h.hexdigest()


def read_card(url: str) -> DatasetCard:
    check_reachable(url)
    fs, path = filesystem(url)
    try:
        with fs.open(join(path, CARD), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputNotFound(f"{url}: {NOT_A_SET if fs.exists(path) else NOTHING_THERE}") from None
    try:
        return DatasetCard.model_validate_json(text)
    except ValidationError as e:
        raise UserError(f"{url}: {CARD} is not an orbitgen card ({e.error_count()} problems, first: "
                        f"{'.'.join(map(str, e.errors()[0]['loc'])) or '(card)'}: {e.errors()[0]['msg']})") from None


def write_card(url: str, card: DatasetCard) -> None:
    fs, path = filesystem(url)
    with fs.open(join(path, CARD), "wb") as f:
        f.write(card.model_dump_json(indent=2).encode())


def read_manifest(url: str) -> pd.DataFrame:
    """Columns url (full shard URL), samples, bytes, sha256; one row a shard, in order."""
    fs, path = filesystem(url)
    try:
        with fs.open(join(path, MANIFEST), "rb") as f:
            df = pq.read_table(io.BytesIO(f.read())).to_pandas()
    except FileNotFoundError:
        if not fs.exists(join(path, CARD)):
            raise InputNotFound(f"{url}: {NOT_A_SET}") from None
        raise InputNotFound(f"{url}: no {MANIFEST}: the shard set is incomplete "
                                "(interrupted build?); build it again") from None
    refuse_outside(df["url"], url)
    df["url"] = [join(to_url(url), u) for u in df["url"]]
    return df


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
    with fs.open(join(path, MANIFEST), "wb") as f:
        f.write(buf.getvalue())
