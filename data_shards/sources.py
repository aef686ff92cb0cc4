"""Sources: what a shard set is built from, and the folder-based layouts.

A source is an iterator of `Sample`s and `Skipped` items: an item that can't become a sample
(unreadable file, unmatched pair) is yielded as `Skipped`, and the build's `--on-error` policy
decides whether that stops the build or goes to the report. Errors about the source as a whole
(no such folder) are raised at once.

Every image goes through the same steps: its header checked against the pixel cap
(`image_header`: nothing is decoded before), read to an (H, W, C) array (PIL, or tifffile for
TIFFs with any band count), channel policy, centre crop + resize (`pixels`). Sample keys are
made from file names by `sample_keys`; the name itself is kept in the sample's `json`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .errors import InputNotFound, UserError
from .image_header import (EmptyImage, UnreadableImage, UnsupportedLayout, check_pixels, open_lazily, pil_header,
                           tiff_header)
from .pixels import apply_channels, channel_policy, fit, from_pil, hwc, to_uint8
from .sample_keys import unique_keys
from .storage import check_reachable, filesystem
from .threads import in_threads

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")
# A side-by-side pair is two square halves; a few pixels of slack for odd crops.
PAIR_ASPECT_TOLERANCE = 0.05


@dataclass
class Sample:
    """One training example. `image` is what is generated; the optional parts serve the
    conditional families (`cond` the input image, `mask` a segmentation mask, `cls` a label).
    `meta` is stored as the sample's `json`."""

    key: str
    image: np.ndarray  # (H, W, C) uint8
    meta: dict = field(default_factory=dict)
    cond: np.ndarray | None = None
    mask: np.ndarray | None = None
    cls: int | None = None


@dataclass
class Skipped:
    """A source item that did not become a sample: `item` names it (a path, `file.csv:7`)."""

    item: str
    reason: str


@dataclass
class Source:
    """What a layout reader returns: the items, the class names when samples carry `cls`, and
    notes for the build summary (e.g. how many nodata tiles were dropped), filled as it runs."""

    items: Iterator[Sample | Skipped]
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def tiff_array(data: bytes, name: str = "TIFF") -> np.ndarray:
    """The first image of a TIFF as (H, W, bands) in its own dtype; a declared alpha band dropped.
    A stack of several multi-band images, or complex values, is refused: no one image to take."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series, page = tif.series[0], tif.pages[0]
        axes, shape = series.axes, tuple(series.shape)
        if len(shape) > 3 and int(np.prod(shape[:-3])) > 1:
            raise UnsupportedLayout(f"{name}: a TIFF of shape {shape} (axes {axes!r}) holds several multi-band "
                                    "images; supported: one image with any number of bands (H, W, bands)")
        if np.dtype(series.dtype).kind not in "biuf":
            raise UnsupportedLayout(f"{name}: {series.dtype} values; supported: integers or floats")
        a = series.asarray()
        if axes.endswith("SYX") or (a.ndim == 3 and axes.endswith("YX")):
            a = np.moveaxis(a, -3, -1)  # planar bands, or a stack of single-band pages
        a = hwc(a.reshape(a.shape[-3:]) if a.ndim > 3 else a)
        if 0 in a.shape:
            raise EmptyImage(f"{name}: a TIFF of shape {a.shape} (H, W, bands): no pixels or zero bands")
        alpha = [i for i, e in enumerate(page.extrasamples or ()) if int(e) in (1, 2)]  # (un)associated alpha
        if alpha and a.shape[2] in (2, 4):
            a = a[:, :, : a.shape[2] - 1]
        return a


def decode_image(data: bytes, name: str) -> np.ndarray:
    """File bytes -> (H, W, C) uint8. The header is checked against the pixel cap first
    (UnreadableImage names `name`). TIFFs keep every band (tifffile; PIL as a fallback for
    codecs tifffile lacks); other formats are read by PIL (gray stays gray, alpha dropped)."""
    if name.lower().endswith(TIFF_EXTENSIONS):
        try:
            header = tiff_header(data, name)
        except EmptyImage:
            raise
        except UnreadableImage:
            header = None  # not a TIFF tifffile reads: PIL may manage
        if header is not None:
            check_pixels(header, name)
            try:
                return to_uint8(tiff_array(data, name))
            except UnsupportedLayout:
                raise
            except Exception:  # e.g. JPEG-compressed TIFF without imagecodecs: PIL may manage
                pass
    img = open_lazily(data, name)
    check_pixels(pil_header(img), name)
    try:
        img.load()
        return from_pil(img)
    except Exception as exc:  # truncated or damaged pixel data
        raise UnreadableImage(f"{name}: does not decode: {type(exc).__name__}: {exc}") from None


def prepare(a: np.ndarray, resolution: int, policy: str) -> np.ndarray:
    return fit(apply_channels(a, policy), resolution)


def prepare_mask(a: np.ndarray, resolution: int) -> np.ndarray:
    """Masks: one band, nearest-neighbour resize (class values and 0/255 edges stay exact)."""
    return fit(apply_channels(a, "gray"), resolution, Image.Resampling.NEAREST)


def read_item(fs, path: str, item: str, make: Callable[[np.ndarray], Sample | Skipped]) -> Sample | Skipped:
    """Read and decode one file and hand the array to `make`; any failure becomes `Skipped(item)`."""
    try:
        with fs.open(path, "rb") as f:
            a = decode_image(f.read(), item)
        return make(a)
    except UnreadableImage as exc:  # its message starts with the item's name
        return Skipped(item, f"cannot read image: {str(exc).removeprefix(f'{item}: ')}")
    except Exception as exc:  # one bad file is that file's problem, whatever the library raised
        return Skipped(item, f"cannot read image: {exc}")


def open_folder(root: str):
    """(fs, path without trailing slash) of an existing folder, or FileNotFoundError."""
    check_reachable(root)
    fs, base = filesystem(root)
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise InputNotFound(f"{root}: no such folder")
    return fs, base


def list_images(fs, base: str) -> list[str]:
    """Image files under `base`, any depth, as paths relative to it, sorted."""
    return sorted(p[len(base) + 1:] for p in fs.find(base) if p.lower().endswith(IMAGE_EXTENSIONS))


def read_folder(root: str, resolution: int, channels: str | int | None = "keep") -> Iterator[Sample | Skipped]:
    """`folder`: every image under `root` (a path or fsspec URL, any depth, sorted) -> `image`."""
    policy = channel_policy(channels)
    fs, base = open_folder(root)

    def one(key_rel):
        key, rel = key_rel
        return read_item(fs, f"{base}/{rel}", rel, lambda a: Sample(
            key=key, image=prepare(a, resolution, policy), meta={"source": rel}))

    yield from in_threads(one, unique_keys(list_images(fs, base), root).items())


def read_class_folders(root: str, resolution: int, channels: str | int | None = "keep") -> Source:
    """`class-folders`: one sub-folder per class (sorted names -> cls 0, 1, ...), images at any
    depth inside; files outside a class folder are skipped."""
    policy = channel_policy(channels)
    fs, base = open_folder(root)
    rels = list_images(fs, base)
    classes = sorted({rel.split("/", 1)[0] for rel in rels if "/" in rel})
    if rels and not classes:   # a flat folder: every item would be skipped as outside a class
        raise UserError(f"{root}: no class sub-folders, its images lie directly in it; class-folders wants "
                        "SOURCE/<class>/<image> (for a flat folder use --layout folder)")

    def one(key_rel) -> Sample | Skipped:
        key, rel = key_rel
        if "/" not in rel:
            return Skipped(rel, "not inside a class folder")
        cls = classes.index(rel.split("/", 1)[0])
        return read_item(fs, f"{base}/{rel}", rel, lambda a: Sample(
            key=key, image=prepare(a, resolution, policy), cls=cls, meta={"source": rel, "class": classes[cls]}))

    return Source(in_threads(one, unique_keys(rels, root).items()), classes=classes)


def read_side_by_side(root: str, resolution: int, channels: str | int | None = "keep",
                      input_side: str = "left") -> Iterator[Sample | Skipped]:
    """`side-by-side`: pix2pix pairs, input and target halves of one image (the maps set:
    satellite left, map right). `input_side` is the half that becomes `cond`."""
    if input_side not in ("left", "right"):
        raise UserError(f"input_side must be left or right, not {input_side!r}")
    policy = channel_policy(channels)
    fs, base = open_folder(root)

    def split(a: np.ndarray, key: str, rel: str) -> Sample | Skipped:
        half = a.shape[1] // 2
        if half < 1:
            return Skipped(rel, f"{a.shape[1]} pixels wide: nothing to split")
        if abs(a.shape[1] - 2 * a.shape[0]) > PAIR_ASPECT_TOLERANCE * 2 * a.shape[0]:
            return Skipped(rel, f"{a.shape[1]}x{a.shape[0]} pixels: not a side-by-side pair (twice as wide as "
                                "tall); for single images use --layout folder")
        left, right = a[:, :half], a[:, half:2 * half]
        cond, image = (left, right) if input_side == "left" else (right, left)
        return Sample(key=key, image=prepare(image, resolution, policy), cond=prepare(cond, resolution, policy),
                      meta={"source": rel, "input_side": input_side})

    def one(key_rel):
        key, rel = key_rel
        return read_item(fs, f"{base}/{rel}", rel, lambda a: split(a, key, rel))

    yield from in_threads(one, unique_keys(list_images(fs, base), root).items())


def read_paired_folders(root: str, resolution: int, channels: str | int | None = "keep",
                        cond_dir: str = "cond", image_dir: str = "image") -> Iterator[Sample | Skipped]:
    """`paired-folders`: `root/cond_dir` and `root/image_dir` matched by relative path without
    extension (satellite tile <-> ground photo); a file without a partner is skipped."""
    policy = channel_policy(channels)
    fs, base = open_folder(root)
    sides = {}
    for name in (cond_dir, image_dir):
        _, folder = open_folder(f"{root.rstrip('/')}/{name}")
        sides[name] = (folder, unique_keys(list_images(fs, folder), f"{root}/{name}"))
    (cond_base, conds), (image_base, images) = sides[cond_dir], sides[image_dir]

    def one(key: str) -> Sample | Skipped:
        if key not in images:
            return Skipped(f"{cond_dir}/{conds[key]}", f"no matching file in {image_dir}/")
        if key not in conds:
            return Skipped(f"{image_dir}/{images[key]}", f"no matching file in {cond_dir}/")
        cond_item, image_item = f"{cond_dir}/{conds[key]}", f"{image_dir}/{images[key]}"
        cond = read_item(fs, f"{cond_base}/{conds[key]}", cond_item, lambda a: a)
        if isinstance(cond, Skipped):
            return cond
        return read_item(fs, f"{image_base}/{images[key]}", image_item, lambda a: Sample(
            key=key, image=prepare(a, resolution, policy), cond=prepare(cond, resolution, policy),
            meta={"source": image_item, "cond_source": cond_item}))

    yield from in_threads(one, sorted(set(conds) | set(images)))
