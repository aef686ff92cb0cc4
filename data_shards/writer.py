"""Samples -> WebDataset tar shards at any fsspec URL, plus `dataset.json` and `manifest.parquet`.

Nothing half-written: the whole set (shards, skipped list, card, manifest) is written under
`<dest>/.tmp-<uuid>/` first, then moved into place (`publish`: renames on a local disk, so a full
disk cannot stop it halfway) with the manifest last, so a manifest that reads whole means the set
is complete. One build at a time publishes into a folder (`publishing`: an O_EXCL lock file; on S3 a
conditional-PUT lease, `publish_lock.py`), and
checks there that no other build finished meanwhile. A failure removes what this build wrote
(staging folder, moved files, folders it created): the destination is left as it was. A folder
holding part of a set (a build cut short) is refused (`PartialSet`), never written into.
Tar headers carry a fixed mtime and PNG/JSON encoding is deterministic: the same samples
give the same bytes, hence the same fingerprint, which is how a rebuild is recognised.
A sample is `KEY.png` (+ `KEY.cond.png`, `KEY.mask.png`, `KEY.cls`, `KEY.json`): the common
WebDataset names, which plain `webdataset`, Ray Data and `tarfile` read as they are; images with
more than 4 bands, which PNG can't hold, are `.npy` instead. Sets written before (`image.png`,
`image.npy`) still read (member_names.py `part_names`).
"""
from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import uuid
from contextlib import contextmanager, suppress
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import InputExists, UserError
from .card import CARD, MANIFEST, SKIPPED, DatasetCard, complete_card, fingerprint, is_set_file, read_card, \
    write_card, write_manifest
from .member_names import written_name
from .pixels import PIL_MODES
from .sources import Sample
from .storage import filesystem, join, storage_problem, to_url
from .threads import in_threads

log = logging.getLogger(__name__)

TAR_MTIME = 0  # reproducible tar files


class _Hashing(io.RawIOBase):
    """Write-through file wrapper that counts bytes and computes sha256 on the way."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.f.write(b)
        return len(b)


def encode_png(a: np.ndarray) -> bytes:
    """(H, W, 1|2|3|4) uint8 -> 8-bit L / LA / RGB / RGBA PNG; lossless."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in PIL_MODES:
        raise ValueError(f"need an (H, W, 1-4) uint8 array, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, PIL_MODES[a.shape[2]]).save(
        buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(a: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> .npy bytes (for more bands than PNG holds; every reader has np.load)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def image_extension(channels: int) -> str:
    return "png" if channels in PIL_MODES else "npy"


def encode_image(a: np.ndarray) -> tuple[str, bytes]:
    """(extension, bytes): PNG up to 4 bands, .npy beyond."""
    ext = image_extension(a.shape[2])
    return ext, encode_png(a) if ext == "png" else encode_npy(a)


def _modalities(s: Sample) -> list[str]:
    return ["image"] + [m for m in ("cond", "mask", "cls") if getattr(s, m) is not None] + ["json"]


def _record(s: Sample, resolution: int, channels: int, modalities: list[str]) -> dict:
    if not s.key or "." in s.key or s.key.startswith("_"):
        raise ValueError(f"sample key {s.key!r}: must be non-empty, no '.', not start with '_' "
                         "(webdataset splits file names at the first dot)")
    if _modalities(s) != modalities:
        raise ValueError(f"sample {s.key} has parts {_modalities(s)}, earlier samples {modalities}")
    rec = {"__key__": s.key}
    for m, bands in (("image", channels), ("cond", channels), ("mask", 1)):
        a = getattr(s, m)
        if a is None:
            continue
        if a.shape != (resolution, resolution, bands) or a.dtype != np.uint8:
            raise ValueError(f"sample {s.key}: {m} is {a.dtype} {a.shape}, the set promises uint8 "
                             f"{(resolution, resolution, bands)}")
        ext, data = encode_image(a)
        rec[written_name(m, ext)] = data
    if s.cls is not None:
        rec["cls"] = str(int(s.cls)).encode()
    rec["json"] = json.dumps(s.meta, sort_keys=True).encode()
    return rec


def _write_shard(fs, path: str, records: Iterator[dict], max_samples: int, max_bytes: int | None) -> tuple[int, int, str]:
    """Write records until the shard holds `max_samples` or `max_bytes` (whichever comes first).
    On an object store, an error of the upload (a missing bucket, no credentials, access denied)
    ends as one line naming the set (`storage_problem`); the samples' own errors stay as they are."""
    import webdataset as wds  # imports torch: only when actually writing
    from fsspec.implementations.local import LocalFileSystem

    pulled = _Pulled(records)
    n = 0
    try:
        with fs.open(path, "wb") as f:
            out = _Hashing(f)
            with wds.TarWriter(out, encoder=False, mtime=TAR_MTIME) as tar:
                for rec in pulled:
                    tar.write(rec)
                    n += 1
                    if n >= max_samples or (max_bytes is not None and out.size >= max_bytes):
                        break
    except Exception as e:
        if e is pulled.error or isinstance(fs, LocalFileSystem):   # a local disk's errors: write_shards names them
            raise
        problem = storage_problem(e, fs.unstrip_protocol(path.rsplit("/", 2)[0]))   # <set>/.tmp-…/shard: the set
        if problem is None or problem is e:
            raise
        raise problem from e
    return n, out.size, out.sha.hexdigest()


class _Pulled:
    """An iterator that keeps the error its source raised: a sample's, not the store's."""

    def __init__(self, source: Iterator[dict]):
        self.source, self.error = source, None

    def __iter__(self) -> "_Pulled":
        return self

    def __next__(self) -> dict:
        try:
            return next(self.source)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


class PartialSet(InputExists):
    """The destination holds files of a shard set without a manifest that reads whole."""


LOCK = ".orbitgen-publish.lock"   # in the set's folder while a build moves its files in
LOCK_WAIT_S, LOCK_POLL_S = 10.0, 0.1   # publishing is a few renames: a lock held longer is stale
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def existing_set(dest: str, fs, root: str) -> DatasetCard | None:
    """The card of a complete set at `dest`; None when no set is there. Refused (`PartialSet`,
    one line naming the folder and what is in it), as nothing is written there: files of a set
    without a manifest that reads whole (a build cut short), a `dataset.json` that is not an
    orbitgen card (another tool's, e.g. StyleGAN's), tar files that are not this layout's shards."""
    if not fs.exists(root):
        return None
    card = complete_card(dest)
    if card is not None:
        return card
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    ours = [n for n in names if is_set_file(n)]
    foreign_tars = [n for n in names if n.endswith(".tar") and n not in ours]
    if not ours and not foreign_tars:
        return None
    if foreign_tars:
        why = f"tar files that are not orbitgen shards ({_shown(foreign_tars)})"
    elif CARD in ours and not _is_our_card(dest):
        why = f"a {CARD} that is not an orbitgen card (another tool's set?)"
    else:
        missing = "no manifest" if MANIFEST not in ours else f"a {MANIFEST} that does not read whole"
        why = f"part of a shard set ({_shown(ours)}; {missing}: a build cut short?)"
    raise PartialSet(f"{dest} holds {why}; nothing was written there: remove those files or pick another dest")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_our_card(dest: str) -> bool:
    try:
        read_card(dest)
        return True
    except UserError:
        return False


def _refuse_other(dest: str, existing: DatasetCard, card: DatasetCard) -> None:
    if existing.fingerprint != card.fingerprint:
        raise InputExists(f"{dest} already holds a shard set with other content "
                          f"(fingerprint {existing.fingerprint[:12]}, new {card.fingerprint[:12]})")


@contextmanager
def publishing(dest: str, fs, root: str) -> Iterator[None]:
    """Only one build at a time moves files into `root`; the check that nobody finished meanwhile
    happens inside. The lock (data_shards/publish_lock.py): a file made with O_EXCL on a local disk,
    an object made by a conditional PUT (a lease) on S3."""
    from .publish_lock import publish_lock

    with publish_lock(dest, fs, root, name=LOCK, wait_s=LOCK_WAIT_S, poll_s=LOCK_POLL_S):
        yield


def publish(fs, staged: str, root: str, names: list[str]) -> None:
    """Move `names` from `staged` into `root`, in order (the manifest last): all of them or, on a
    failure, none (what was moved goes again)."""
    moved: list[str] = []
    try:
        for name in names:
            fs.mv(join(staged, name), join(root, name))
            moved.append(join(root, name))
    except BaseException:
        for path in reversed(moved):
            try:
                fs.rm(path)
            except Exception as e:   # reported, not raised: the first error is the one to tell
                log.warning("could not remove %s after a failed publish: %s", path, e)
        raise


def _one_line(e: OSError, dest: str) -> OSError:
    """A disk or permission error, as one line naming the set (same type and errno for the CLI)."""
    where = f" ({e.filename})" if e.filename else ""
    return OSError(e.errno, f"cannot write the shard set {dest}{where}: {e.strerror or e}; "
                            "nothing was left there")


def _existing_or_publishing(dest: str, fs, root: str) -> DatasetCard | None:
    """`existing_set`, where part of a set may be another build publishing right now: it is whole
    once that build releases the lock. A store that cannot be read ends as one line naming `dest`."""
    try:
        try:
            return existing_set(dest, fs, root)
        except PartialSet:
            with publishing(dest, fs, root):
                return existing_set(dest, fs, root)
    except UserError:
        raise
    except Exception as e:   # e.g. botocore's NoCredentialsError: before anything is written
        problem = storage_problem(e, dest)
        if problem is None or problem is e:
            raise
        raise problem from e


def write_shards(samples: Iterable[Sample], dest: str, *, layout: str, resolution: int, channels: int,
                 source: str, shard_samples: int = 1000, shard_bytes: int | None = None,
                 classes: Sequence[str] | None = None, skipped: Sequence[dict] = (),
                 progress: bool = True) -> DatasetCard:
    """Write `samples` as `shard-000000.tar`, ... under `dest`; returns the card written.

    A shard closes at `shard_samples` samples or once it reaches `shard_bytes`. `skipped` is
    what the source left out (`{"item", "reason"}` dicts, read once `samples` is exhausted):
    it goes to `skipped.jsonl` beside the card. An existing complete set at `dest` is left
    alone if it has the same content (its card is returned), otherwise `FileExistsError`; part of
    a set there is refused (`PartialSet`). On any error the destination is left as it was; a disk
    or permission error is re-raised as one line naming the set (same errno).
    """
    from tqdm import tqdm

    if shard_samples < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ValueError("shard_samples and shard_bytes must be >= 1")
    dest = to_url(dest).rstrip("/")
    fs, root = filesystem(dest)
    existing = _existing_or_publishing(dest, fs, root)
    what = dict(layout=layout, resolution=resolution, channels=channels)  # content decides the rest
    if existing is not None and existing.model_dump(include=set(what)) != what:
        raise InputExists(f"{dest} already holds a different shard set "
                              f"({existing.model_dump(include=set(what))}); remove it or pick another dest")

    tmp = join(root, f".tmp-{uuid.uuid4().hex}")
    made = _missing_folders(fs, root)   # a failed build removes the folders it created, not ones it found
    try:
        seen: set[str] = set()
        modalities: list[str] = []

        def checked():
            for s in samples:
                if s.key in seen:
                    raise ValueError(f"duplicate sample key {s.key!r}")
                seen.add(s.key)
                if not modalities:
                    modalities.extend(_modalities(s))
                yield s

        def records():  # PNG encoding is most of a build's time: in threads
            for rec in in_threads(lambda s: _record(s, resolution, channels, modalities), checked()):
                yield rec
                bar.update(1)

        shards = []
        stream = records()
        with tqdm(desc=f"writing {dest}", unit="img", disable=not progress, file=sys.stderr) as bar:
            while True:
                first = next(stream, None)  # don't leave an empty last shard
                if first is None:
                    break
                name = f"shard-{len(shards):06d}.tar"
                n, size, sha = _write_shard(fs, join(tmp, name), itertools.chain([first], stream),
                                            shard_samples, shard_bytes)
                shards.append({"url": name, "samples": n, "bytes": size, "sha256": sha})
        if not shards:
            raise ValueError(f"no samples to write to {dest}" + (f" ({len(skipped)} skipped)" if skipped else ""))

        card = DatasetCard(layout=layout, modalities=modalities, resolution=resolution, channels=channels,
                           count=sum(s["samples"] for s in shards),
                           fingerprint=fingerprint([s["sha256"] for s in shards]),
                           shards=len(shards), source=source,
                           classes=list(classes) if classes is not None else None, skipped=len(skipped))
        # The whole set is staged first; publishing then only moves files (no disk space needed).
        names = [s["url"] for s in shards]
        if skipped:
            fs.pipe_file(join(tmp, SKIPPED), "".join(json.dumps(dict(s), sort_keys=True) + "\n"
                                                     for s in skipped).encode())
            names.append(SKIPPED)
        write_card(join(dest, tmp.rsplit("/", 1)[-1]), card)
        write_manifest(join(dest, tmp.rsplit("/", 1)[-1]), shards)
        with publishing(dest, fs, root):
            existing = existing_set(dest, fs, root)  # again: another writer may have finished meanwhile
            if existing is not None:
                _refuse_other(dest, existing, card)
                log.info("%s already holds this shard set; nothing to do", dest)
                return existing
            publish(fs, tmp, root, [*names, CARD, MANIFEST])   # the manifest last: complete from here on
        return card
    except OSError as e:
        _clean_up(fs, tmp, made)
        ours = e.filename is None or str(e.filename).startswith(root)   # not the source's (read) errors
        if e.errno in WRITE_ERRNOS and ours and not isinstance(e, (InputExists, FileNotFoundError)):
            raise _one_line(e, dest) from None
        raise
    except BaseException:
        _clean_up(fs, tmp, made)
        raise
    finally:
        _clean_up(fs, tmp, [])   # the emptied staging folder (or, after a failure, already gone)


def _missing_folders(fs, root: str) -> list[str]:
    """`root` and those of its parents that do not exist yet (a local disk; an object store has no
    folders), deepest first: the ones writing the set will create."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        return [root] if not fs.exists(root) else []
    missing, path = [], root
    for _ in range(root.count("/")):   # bounded by the path's depth
        if os.path.exists(path):
            break
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _clean_up(fs, tmp: str, made: list[str]) -> None:
    """After a failure: the staging folder goes, and the folders this build made if nothing else
    is in them now (a concurrent build's staging folder keeps them)."""
    fs.invalidate_cache()   # s3fs lists from a cache: what was moved out may still be listed
    try:
        if fs.exists(tmp):
            with suppress(FileNotFoundError):   # an object store: no objects, no "folder" to remove
                fs.rm(tmp, recursive=True)
        for folder in made:   # deepest first
            if fs.exists(folder) and not fs.ls(folder, detail=False):
                fs.rm(folder, recursive=True)
    except Exception as e:   # the first error is the one to tell
        log.warning("could not clean up after a failed build in %s: %s", tmp.rsplit("/", 1)[0], e)
