"""Adopting WebDataset shards made elsewhere: a card and manifest for them, without copying a byte.

What a user may already have, and `data.train`, `data adopt`, `data inspect` and `data verify`
accept:
  * a brace-expanded shard URL on any fsspec filesystem: `s3://b/x/shard-{000000..000099}.tar`
    (numeric ranges, zero-padded as written, and comma lists; several groups multiply);
  * a folder of plain tars with no dataset.json (every `*.tar` in it, in name order);
  * a dataset.json with `shards_url` (a pattern or a folder) and no manifest: a card that points
    at shards elsewhere (the rest of its fields are filled in here).
Members are matched by the common extensions (member_names.py `part_names`): the image as `png`,
`jpg`, `jpeg`, `webp`, `tif`/`tiff` or `npy`; `cond.*` and `mask.*` for pairs; `cls`; `json`.

On first use every shard is read once: its size and sha256 (the fingerprint is the one
`data build` computes, so `data verify` checks an adopted set like any other), its samples'
keys, and each image's size and bands from its header alone (no pixel is decoded). The card
records the counts, resolution, channels, the members found, the split by key under the
holdout asked (split.py's hash), and where the shards are. It goes beside the shards when that
is writable (a folder's card in the folder; a pattern's in a hidden folder beside it, see
card.py `adopted_folder`), else under `fallback` (the job's storage), and `Adopted.note` says
where. A card already written is reused when the shards' names and sizes still match its
manifest (one listing per folder, no shard read); otherwise the set is adopted again.

Sizes: orbitgen trains on one square size. Images of several sizes, or not square, are refused
in one line unless `resize_to` is given (data.resize: resize); then the card promises that size
and says `resize`, and decode.py fits each image on read.
"""
from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from .card import CARD, MANIFEST, NOT_A_SET, DatasetCard, adopted_folder, card_home, fingerprint, is_pattern, \
    pattern_base, read_card, read_manifest, write_card, write_manifest
from .decode import IMAGE_KEYS, CorruptSample, header_shape
from .errors import InputNotFound, UserError
from .member_names import IMAGE_EXTENSIONS, find_part
from .shard_reader import read_shard, tar_samples
from .split import held_out_keys
from .storage import check_reachable, filesystem, join, to_url

LAYOUT = "webdataset"            # the layout an adopted card names
MAX_SHARDS = 1_000_000           # a brace pattern expanding to more is refused (a typo, not a set)
_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


# --- Which shards ---------------------------------------------------------------------------

def _options(body: str) -> list[str]:
    """The alternatives of one brace group's body: `000..009` (padded to the wider end when either
    end is written with a leading zero), `a..b..step`, or `x,y,z`; anything else stays literal."""
    m = _RANGE.fullmatch(body)
    if m:
        a, b, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (m.group(1), m.group(2)))
        width = max(len(m.group(1)), len(m.group(2))) if padded else 0
        direction = 1 if b >= a else -1
        return [f"{n:0{width}d}" for n in range(a, b + direction, direction * max(step, 1))]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """`shard-{000..002}.tar` -> [shard-000.tar, shard-001.tar, shard-002.tar], in written order."""
    pieces: list[list[str]] = []
    at = 0
    for m in _GROUP.finditer(pattern):
        pieces += [[pattern[at:m.start()]], _options(m.group(1))]
        at = m.end()
    pieces.append([pattern[at:]])
    literal = "".join(p[0] for p in pieces if len(p) == 1)
    if "{" in literal.replace("{}", "") or "}" in literal.replace("{}", ""):
        raise UserError(f"{pattern}: nested or unbalanced braces; write ranges as {{000000..000099}} or lists as {{a,b}}")
    total = 1
    for p in pieces:
        total *= len(p)
    if total > limit:
        raise UserError(f"{pattern}: expands to {total:,} shard URLs, more than the {limit:,} allowed")
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _files(folder: str) -> list[dict]:
    """fsspec's detailed listing of `folder` (none when it does not exist), never from a stale cache."""
    fs, path = filesystem(folder)
    fs.invalidate_cache(path)   # object stores cache listings: a shard added since must show
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def list_shards(url: str) -> list[tuple[str, int]]:
    """(shard URL, bytes) of a brace pattern (every expansion must exist) or of a folder's `*.tar`
    files (name order); a folder with none raises InputNotFound naming it."""
    url = to_url(url).rstrip("/")
    if not is_pattern(url):
        entries = _files(url)
        tars = sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], int(e.get("size") or 0)) for e in entries
                      if e.get("type") == "file" and e["name"].endswith(".tar"))
        if not tars:
            raise InputNotFound(f"{url}: {NOT_A_SET} (and no .tar files to adopt)")
        return [(join(url, name), size) for name, size in tars]
    urls = expand_braces(url)
    sizes: dict[str, int] = {}
    for folder in dict.fromkeys(u.rsplit("/", 1)[0] for u in urls):   # one listing per folder
        entries = _files(folder)
        sizes.update({join(folder, e["name"].rstrip("/").rsplit("/", 1)[-1]): int(e.get("size") or 0)
                      for e in entries if e.get("type") == "file"})
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise InputNotFound(f"{url}: {len(missing)} of its {len(urls)} shards do not exist, e.g. {missing[0]}")
    return [(u, sizes[u]) for u in urls]


# --- What is in them --------------------------------------------------------------------------

@dataclass
class Scan:
    """What one read of every shard found."""

    rows: list[dict] = field(default_factory=list)        # manifest rows: url (full), samples, bytes, sha256
    keys: list[str] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)      # (H, W, bands) of the images -> samples
    example: dict = field(default_factory=dict)           # (H, W, bands) -> (shard, key) of a first sample
    present: Counter = field(default_factory=Counter)     # modality -> samples holding it
    members: dict[str, set] = field(default_factory=dict)  # modality -> member names found
    unreadable: list[str] = field(default_factory=list)   # images whose header does not read (counted, not sized)


def scan(shards: list[str]) -> Scan:
    """Reads each shard once (one at a time: memory holds one shard): sizes, hashes, keys, and
    each image's shape from its header."""
    out = Scan()
    for url in shards:
        data = read_shard(url)
        n = 0
        for raw in tar_samples(io.BytesIO(data), url):
            n += 1
            out.keys.append(raw["__key__"])
            for modality in (*IMAGE_KEYS, "cls", "json"):
                part = find_part(raw, modality)
                if part is not None:
                    out.present[modality] += 1
                    out.members.setdefault(modality, set()).add(part)
            part = find_part(raw, "image")
            if part is None:
                shown = sorted(p for p in raw if not p.startswith("__"))
                raise UserError(f"{url}: sample {raw['__key__']!r} has no image member (members: {', '.join(shown)}); "
                                f"an image is one of {', '.join(IMAGE_EXTENSIONS)}")
            try:
                shape = header_shape(part, raw[part], f"{url}: sample {raw['__key__']!r} part {part}")
            except CorruptSample as exc:   # kept in the count (positions stay exact); readers skip it
                out.unreadable.append(str(exc))
                continue
            out.shapes[shape] += 1
            out.example.setdefault(shape, (url, raw["__key__"]))
        out.rows.append({"url": url, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return out


def _one_size(found: Scan, source: str, resize_to: int | None) -> tuple[int, int]:
    """(resolution, channels) the card promises; refused in one line where the images disagree."""
    bands = Counter()
    for (h, w, c), n in found.shapes.items():
        bands[c] += n
    if len(bands) > 1:
        shown = ", ".join(f"{c} band{'s' * (c != 1)}: {n}" for c, n in bands.most_common())
        raise UserError(f"{source}: images with different band counts ({shown}); orbitgen reads one band count per "
                        "set: build a set with `orbitgen data build --channels gray|rgb` instead")
    channels = next(iter(bands))
    if resize_to is not None:
        return resize_to, channels
    sides = {(h, w) for h, w, _ in found.shapes}
    if len(sides) == 1 and (side := next(iter(sides)))[0] == side[1]:
        return side[0], channels
    top = found.shapes.most_common(3)
    shown = ", ".join(f"{h}x{w}: {n}" for (h, w, _), n in top) + (" ..." if len(found.shapes) > 3 else "")
    shard, key = found.example[top[-1][0]]
    raise UserError(f"{source}: images of {'several sizes' if len(sides) > 1 else 'a size that is not square'} "
                    f"({shown}; e.g. {key!r} in {shard}); set data.resize: resize (or `orbitgen data adopt URL "
                    "--resize N`) to centre-crop and resize them on read")


def card_for(found: Scan, source: str, base: str, *, resize_to: int | None, holdout, beside: bool) -> DatasetCard:
    """The card of a scanned set; `base`: the folder the manifest's names are relative to."""
    if not found.rows or not found.keys:
        raise UserError(f"{source}: the shards hold no samples")
    if not found.shapes:
        raise UserError(f"{source}: no image header of its {len(found.keys)} samples reads, e.g. {found.unreadable[0]}")
    resolution, channels = _one_size(found, source, resize_to)
    everywhere = [m for m in (*IMAGE_KEYS, "cls", "json") if found.present[m] == len(found.keys)]
    order = ["image", "cond", "mask", "cls", "json"]   # as `data build` lists them
    split = None
    if holdout is not None:
        try:
            out = held_out_keys(found.keys, holdout)
        except ValueError as exc:   # a holdout value that is no fraction or count
            raise UserError(str(exc).replace("data.holdout", "holdout")) from None
        split = {"holdout": holdout, "by": "key hash (data_shards/split.py)", "training": len(found.keys) - len(out),
                 "held_out": len(out)}
    return DatasetCard(layout=LAYOUT, modalities=[m for m in order if m in everywhere], resolution=resolution,
                       channels=channels, count=len(found.keys), shards=len(found.rows),
                       fingerprint=fingerprint([r["sha256"] for r in found.rows]), source=source,
                       shards_url=None if beside else base, resize=resize_to is not None,
                       members={m: sorted(found.members[m]) for m in order if m in found.members}, split=split)


# --- Writing the card, or finding the one written before ---------------------------------------

@dataclass
class Adopted:
    url: str                 # the folder of the card: what the rest of the pipeline reads as the set
    card: DatasetCard
    written: bool            # False: a card written before was reused
    note: str | None = None  # a line for the console: where the card went, and why there


def _fallback_folder(fallback: str, source: str, resize_to: int | None) -> str:
    described = source + (f"|resize={resize_to}" if resize_to is not None else "")
    return join(to_url(fallback), hashlib.sha256(described.encode()).hexdigest()[:12])


def _write(folder: str, card: DatasetCard, rows: list[dict], base: str) -> None:
    names = [{**r, "url": r["url"][len(base) + 1:]} for r in rows]
    write_card(folder, card)
    write_manifest(folder, names)   # last: a manifest that reads whole means the card is complete


def _not_writable(exc: BaseException) -> bool:
    """A read-only disk or bucket (s3fs raises PermissionError for AccessDenied), or a full one,
    also when a writer re-raised it as one line (`storage_problem`: the original is its cause)."""
    for _ in range(8):   # a short chain of causes; bounded all the same
        if exc is None:
            return False
        if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _matches(folder: str, listing: list[tuple[str, int]]) -> DatasetCard | None:
    """The card at `folder` when its manifest lists exactly `listing` (names and sizes), else None."""
    try:
        card, manifest = read_card(folder), read_manifest(folder)
    except (UserError, FileNotFoundError):
        return None
    return card if list(zip(manifest.url, (int(b) for b in manifest.bytes))) == listing else None


def _existing(folders: list[str]) -> str | None:
    for folder in folders:
        fs, path = filesystem(folder)
        if fs.exists(join(path, MANIFEST)):
            return folder
    return None


def adopt(url: str, *, resize_to: int | None = None, holdout=None, fallback: str | None = None,
          card_dir: str | None = None, refresh: bool = True) -> Adopted:
    """The card of the shards at `url` (a brace pattern or a folder of tars): reused when one was
    written before (with `refresh`, only while the shards' names and sizes match it), else
    written after one read of every shard: into `card_dir` when given, else beside the shards,
    else (not writable there) under `fallback`."""
    url = to_url(url).rstrip("/")
    check_reachable(url)   # a dead S3 endpoint: one line at once, not botocore's retries
    beside = adopted_folder(url, resize_to)
    folders = [to_url(card_dir)] if card_dir else [beside] + ([_fallback_folder(fallback, url, resize_to)] if fallback else [])
    listing = list_shards(url)
    found_at = _existing(folders)
    if found_at is not None:
        card = _matches(found_at, listing) if refresh else read_card(found_at)
        if card is not None:
            return Adopted(found_at, card, written=False)
    base = pattern_base(url) if is_pattern(url) else url
    found = scan([u for u, _ in listing])
    note_changed = " (the shards changed since its card was written)" if found_at is not None else ""
    for folder in folders:
        card = card_for(found, url, base, resize_to=resize_to, holdout=holdout, beside=folder == base)
        try:
            _write(folder, card, found.rows, base)
        except Exception as exc:   # a read-only bucket or disk: the next place, if any
            if not _not_writable(exc) or folder == folders[-1]:
                if _not_writable(exc):
                    raise UserError(f"{url}: cannot write its card to {folder} ({type(exc).__name__}: {exc}); "
                                    "name a writable folder with `orbitgen data adopt URL --card-dir DIR`") from None
                raise
            continue
        where = "beside the shards" if folder == beside else "in the given folder" if card_dir else (
            "under the job's storage: the shards' folder is not writable")
        damaged = (f" ({len(found.unreadable)} image{'s' * (len(found.unreadable) != 1)} unreadable, skipped when "
                   "read; `orbitgen data verify` names them)") if found.unreadable else ""
        return Adopted(folder, card, written=True,
                       note=f"adopted {url}{note_changed}: {card.count} samples in {card.shards} shard"
                            f"{'s' * (card.shards != 1)}{damaged}; card written {where}: {join(folder, CARD)}")
    raise AssertionError("unreachable: the loop returns or raises")


def _pointing_card(url: str) -> str | None:
    """`shards_url` of a dataset.json at `url` that has no manifest yet (a card pointing at shards
    elsewhere, possibly with nothing else in it), else None."""
    fs, path = filesystem(url)
    if fs.exists(join(path, MANIFEST)):
        return None
    try:
        with fs.open(join(path, CARD), "rb") as f:
            doc = json.loads(f.read())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    target = doc.get("shards_url") if isinstance(doc, dict) else None
    return target if isinstance(target, str) and target else None


def resolve(url: str, *, resize_to: int | None = None, holdout=None, fallback: str | None = None,
            refresh: bool = True) -> Adopted | None:
    """What a command reads for `url`: None for a set that is read as it is (orbitgen's own, or one
    whose card is complete), else the adopted card (written on first use, see `adopt`)."""
    url = to_url(url).rstrip("/")
    check_reachable(url)
    if is_pattern(url):
        return adopt(url, resize_to=resize_to, holdout=holdout, fallback=fallback, refresh=refresh)
    fs, path = filesystem(url)
    if (target := _pointing_card(url)) is not None:
        from .card import shards_base

        return adopt(shards_base(url, target), resize_to=resize_to, holdout=holdout, card_dir=url, refresh=refresh)
    if fs.exists(join(path, CARD)):
        try:
            card = read_card(url)
        except UserError:
            return None   # the readers say what is wrong with it
        if card.layout != LAYOUT:
            return None   # orbitgen's own set: read as it is
        if card.source.rstrip("/") == url:   # a folder of tars with its card in it
            return adopt(url, resize_to=resize_to, holdout=holdout, fallback=fallback, refresh=refresh)
        # The folder of an adopted card (written elsewhere, or pointing at shards elsewhere): kept there.
        return adopt(card.source, resize_to=card.resolution if card.resize else None, holdout=holdout, card_dir=url,
                     refresh=refresh)
    try:
        list_shards(url)
    except (InputNotFound, FileNotFoundError):
        return None   # nothing to adopt: the readers' "no dataset.json" / "nothing there" stands
    return adopt(url, resize_to=resize_to, holdout=holdout, fallback=fallback, refresh=refresh)
