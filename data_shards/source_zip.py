"""`stylegan-zip`: a StyleGAN2 `dataset_tool` archive (e.g. Rosetta2495.zip).

The archive holds images (`00000/img00000000.png`, ...) and optionally `dataset.json` with
`{"labels": [["00000/img00000000.png", 6], ...]}` (or `"labels": null`). Integer labels become
`cls`; the class names are then "0", "1", ... (the archive has none).
"""
from __future__ import annotations

import json
import zipfile
from typing import Iterator

from .errors import InputNotFound, UserError
from .member_names import UnsafeMemberName, refuse_unsafe
from .pixels import channel_policy
from .sources import IMAGE_EXTENSIONS, Sample, Skipped, Source, decode_image, prepare, unique_keys
from .storage import filesystem


def _labels(z: zipfile.ZipFile, source: str) -> dict[str, int] | None:
    if "dataset.json" not in z.namelist():
        return None
    labels = json.loads(z.read("dataset.json")).get("labels")
    if labels is None:
        return None
    out = {}
    for name, label in labels:
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise UserError(f"{source}: dataset.json label {label!r} of {name}: only class indices "
                             "(integers >= 0) are supported")
        out[name] = label
    return out


def read_stylegan_zip(source: str, resolution: int, channels: str | int | None = "keep") -> Source:
    policy = channel_policy(channels)
    fs, path = filesystem(source)
    if not fs.isfile(path):
        raise InputNotFound(f"{source}: no such file")
    f = fs.open(path, "rb")
    try:
        z = zipfile.ZipFile(f)
        labels = _labels(z, source)
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError) as exc:
        f.close()
        raise UserError(f"{source}: not a StyleGAN dataset zip: {exc}") from exc
    try:
        refuse_unsafe(z.namelist(), source)
    except UnsafeMemberName:
        z.close()
        f.close()
        raise
    names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
    classes = [str(i) for i in range(max(labels.values(), default=-1) + 1)] if labels is not None else None

    def items() -> Iterator[Sample | Skipped]:
        try:
            for key, name in unique_keys(names, source).items():
                if labels is not None and name not in labels:
                    yield Skipped(name, "no label in dataset.json")
                    continue
                try:
                    image = prepare(decode_image(z.read(name), name), resolution, policy)
                except Exception as exc:  # a damaged member is that member's problem
                    yield Skipped(name, f"cannot read image: {exc}")
                    continue
                cls = labels[name] if labels is not None else None
                yield Sample(key=key, image=image, cls=cls, meta={"source": name})
        finally:
            z.close()
            f.close()

    return Source(items(), classes=classes)
