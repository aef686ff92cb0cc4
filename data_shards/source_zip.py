"""`stylegan-zip`: a StyleGAN2 `dataset_tool` archive (e.g. Rosetta2495.zip).

The archive holds images (`00000/img00000000.png`, ...) and optionally `dataset.json`. Every
shape NVIDIA's dataset_tool writes (and its training code reads) is accepted:
    {"labels": null}                                   no labels
    {"labels": [["00000/img00000000.png", 6], ...]}    name, class index pairs
    {"labels": {"00000/img00000000.png": 6, ...}}      the same as a mapping
Names may use `\\` (archives made on Windows). Integer labels become `cls`; the class names are
then "0", "1", ... (the archive has none). Anything else (a bare list of labels, a file that is
not a JSON object, vector labels) is refused in one line naming the archive.

Members are read one at a time, and only after their declared uncompressed size is checked
against `image_header.max_file_bytes()`; they are inflated a megabyte at a time, so a member
whose sizes lie (a zip bomb declaring 0 bytes) costs CPU in proportion to the archive but no
memory. Each image's header is checked against the pixel cap before it is decoded
(`sources.decode_image`).
"""
from __future__ import annotations

import json
import zipfile
from typing import Iterator

from .errors import InputNotFound, UserError
from .image_header import UnreadableImage, max_file_bytes
from .member_names import refuse_unsafe
from .pixels import channel_policy
from .sample_keys import unique_keys
from .sources import IMAGE_EXTENSIONS, Sample, Skipped, Source, decode_image, prepare
from .storage import filesystem

LABELS_FILE = "dataset.json"
MAX_LABELS_BYTES = 256 << 20  # a label per image: megabytes for millions of images
SHAPES = ('{"labels": null}, {"labels": [["00000/img00000000.png", 6], ...]} or '
          '{"labels": {"00000/img00000000.png": 6, ...}}')


class NotAStyleGANZip(UserError):
    """The archive, or its dataset.json, is not what dataset_tool writes."""


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, refused (ValueError) past `limit`. zipfile's own read() inflates a
    whole deflate stream in one call, however small the size the archive declares."""
    if info.file_size > limit:
        raise ValueError(f"{info.file_size} bytes uncompressed, more than the {limit:,} allowed")
    out = bytearray()
    with z.open(info) as member:
        while chunk := member.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise ValueError(f"more than the {limit:,} bytes allowed once uncompressed")
    return bytes(out)


def _pairs(labels, source: str) -> list:
    """The (name, label) pairs of any accepted `labels` value."""
    if isinstance(labels, dict):
        return list(labels.items())
    if isinstance(labels, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in labels):
        return labels
    shown = json.dumps(labels)[:60]
    raise NotAStyleGANZip(f"{source}: {LABELS_FILE} labels {shown} are neither name/label pairs nor a mapping; "
                          f"dataset_tool writes {SHAPES}")


def read_labels(z: zipfile.ZipFile, source: str) -> dict[str, int] | None:
    """Image name -> class index from the archive's dataset.json; None when it has no labels."""
    info = next((i for i in z.infolist() if i.filename == LABELS_FILE), None)
    if info is None:
        return None
    try:
        doc = json.loads(read_member(z, info, MAX_LABELS_BYTES))
    except Exception as exc:  # damaged member (bad CRC, unknown compression, encrypted) or not JSON
        raise NotAStyleGANZip(f"{source}: {LABELS_FILE} cannot be read as JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict):
        raise NotAStyleGANZip(f"{source}: {LABELS_FILE} holds a JSON {type(doc).__name__}; "
                              f"dataset_tool writes {SHAPES}")
    labels = doc.get("labels")
    if labels is None:
        return None
    out = {}
    for name, label in _pairs(labels, source):
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise NotAStyleGANZip(f"{source}: {LABELS_FILE} label {json.dumps(label)[:40]} of {name!r}: only class "
                                  "indices (integers >= 0) are supported")
        out[name.replace("\\", "/")] = label
    return out


def read_stylegan_zip(source: str, resolution: int, channels: str | int | None = "keep") -> Source:
    policy = channel_policy(channels)
    fs, path = filesystem(source)
    if not fs.isfile(path):
        raise InputNotFound(f"{source}: no such file")
    f = fs.open(path, "rb")
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        f.close()
        raise NotAStyleGANZip(f"{source}: not a StyleGAN dataset zip: {type(exc).__name__}: {exc}") from None
    try:
        labels = read_labels(z, source)
        refuse_unsafe(z.namelist(), source)
        infos = {i.filename: i for i in z.infolist()}
        names = sorted(n for n in infos if n.lower().endswith(IMAGE_EXTENSIONS))
        keys = unique_keys(names, source)
    except BaseException:
        z.close()
        f.close()
        raise
    classes = [str(i) for i in range(max(labels.values(), default=-1) + 1)] if labels is not None else None

    def image(name: str):
        try:
            data = read_member(z, infos[name], max_file_bytes())
        except ValueError as exc:
            raise UnreadableImage(f"{name}: {exc} for an image (not read; raise $ORBITGEN_MAX_IMAGE_PIXELS "
                                  "if it is meant to be)") from None
        return prepare(decode_image(data, name), resolution, policy)

    def items() -> Iterator[Sample | Skipped]:
        try:
            for key, name in keys.items():
                if labels is not None and name not in labels:
                    yield Skipped(name, f"no label in {LABELS_FILE}")
                    continue
                try:
                    a = image(name)
                except UnreadableImage as exc:  # its message starts with the member's name
                    yield Skipped(name, f"cannot read image: {str(exc).removeprefix(f'{name}: ')}")
                    continue
                except Exception as exc:  # a damaged member is that member's problem
                    yield Skipped(name, f"cannot read image: {type(exc).__name__}: {exc}")
                    continue
                cls = labels[name] if labels is not None else None
                yield Sample(key=key, image=a, cls=cls, meta={"source": name})
        finally:
            z.close()
            f.close()

    return Source(items(), classes=classes)
