"""`timeseries-csv`: SpaceNet-7 style time series indexed by a CSV.

Each row names a past image, a change/segmentation mask and a future image (paths relative to
the CSV's folder, or absolute / fsspec URLs) and, optionally, an id and both dates. A sample is
`cond` = past, `mask` = mask (1 band, nearest-neighbour resize), `image` = future, `json` = id,
dates and source paths. A row whose files can't be read is skipped as `rows.csv:LINE`.
"""
from __future__ import annotations

import csv
import io
import re
from typing import Iterator

from .errors import InputNotFound, UserError
from .pixels import channel_policy
from .sources import Sample, Skipped, decode_image, prepare, prepare_mask
from .storage import filesystem

REQUIRED = ("past", "mask", "future")
OPTIONAL = ("id", "past_date", "future_date")


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`"past=before,future=after"` (or a dict) -> role -> CSV column; unnamed roles keep their name."""
    if isinstance(spec, str):
        pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise UserError(f"columns {spec!r}: use ROLE=COLUMN,ROLE=COLUMN")
        spec = {k.strip(): v.strip() for k, v in pairs}
    spec = dict(spec or {})
    unknown = set(spec) - set(REQUIRED + OPTIONAL)
    if unknown:
        raise UserError(f"unknown column roles {sorted(unknown)}; roles: {', '.join(REQUIRED + OPTIONAL)}")
    return {role: spec.get(role, role) for role in REQUIRED + OPTIONAL}


def _key(value: str, line: int) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", value).strip("_")
    return key or f"row-{line:06d}"


def read_timeseries_csv(source: str, resolution: int, channels: str | int | None = "keep",
                        columns: str | dict | None = None) -> Iterator[Sample | Skipped]:
    policy = channel_policy(channels)
    cols = parse_columns(columns)
    fs, path = filesystem(source)
    if not fs.isfile(path):
        raise InputNotFound(f"{source}: no such file")
    with fs.open(path, "rb") as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")))
    header = set(rows[0]) if rows else set()
    missing = [cols[r] for r in REQUIRED if cols[r] not in header]
    if missing:
        raise UserError(f"{source}: no column {', '.join(missing)} (columns: {', '.join(sorted(header)) or 'none'}); "
                         "map them with columns=ROLE=COLUMN,...")
    folder = path.rsplit("/", 1)[0]
    name = path.rsplit("/", 1)[-1]

    def read(ref: str):
        ref_fs, ref_path = filesystem(ref) if "://" in ref else (fs, ref if ref.startswith("/") else f"{folder}/{ref}")
        with ref_fs.open(ref_path, "rb") as f:
            return decode_image(f.read(), ref_path)

    for line, row in enumerate(rows, start=2):  # line 1 is the header
        item = f"{name}:{line}"
        meta = {"source": item, **{r: row[cols[r]] for r in OPTIONAL if cols[r] in header and row[cols[r]]}}
        refs = {r: (row.get(cols[r]) or "").strip() for r in REQUIRED}
        empty = [r for r, v in refs.items() if not v]
        if empty:
            yield Skipped(item, f"empty {', '.join(empty)}")
            continue
        parts, problem = {}, None
        for role, ref in refs.items():
            try:
                parts[role] = read(ref)
            except Exception as exc:  # a row pointing nowhere (or at a broken file) is that row's problem
                problem = Skipped(item, f"{role} {ref}: {type(exc).__name__}: {exc}")
                break
        if problem is not None:
            yield problem
            continue
        meta.update({f"{r}_source": v for r, v in refs.items()})
        yield Sample(key=_key(meta.get("id", ""), line), image=prepare(parts["future"], resolution, policy),
                     cond=prepare(parts["past"], resolution, policy), mask=prepare_mask(parts["mask"], resolution),
                     meta=meta)
