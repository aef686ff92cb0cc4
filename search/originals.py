"""The originals of a search: their pixels, keys and features, read and extracted once.

Trials receive this object through Ray's object store (one copy per node), so no candidate
re-reads the shards or re-extracts the originals' features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data_shards.builtin import ensure_builtin, is_builtin
from data_shards.card import read_card
from data_shards.split import Holdout, Positions, evaluation_positions
from data_shards.stream import iterate_once, training_share
from models.metrics.extractors import make_extractor

BATCH = 256          # images read per shard batch (uint8: 16 MB at 256² x 256)
# Images per extractor forward pass on a CPU. Inception at 299² holds ~15 MB of activations per
# image while a batch runs: featurising 2,500 originals at 256² peaked the driver at 4.4 GB in
# batches of 256, 1.65 GB in 32 and 1.26 GB in 16, and 16 was also the fastest on 2 cores
# (benchmarks/BENCHMARKS.md, "MineAug stage 1 at the paper's scale").
EXTRACT_BATCH = 16
# On a GPU (stage-1 trials given one): larger batches keep it busy; not yet measured on one.
EXTRACT_BATCH_GPU = 32
ORIGINALS_SEED = 0   # the same draw for every search of a set, so their FIDs compare


@dataclass
class Originals:
    images: torch.Tensor       # uint8 (N, C, H, W)
    keys: list[str]            # sample keys, in the order of `images`
    features: np.ndarray       # float32 (N, d), extractor `extractor_name`
    extractor_name: str        # the extractor's `.name` (logged next to every FID)
    channels: int
    url: str = ""
    fingerprint: str = ""

    @property
    def count(self) -> int:
        return int(self.images.shape[0])


def extract(extractor: torch.nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
            batch: int | None = None) -> np.ndarray:
    """Features of uint8 NCHW images, in batches (default: EXTRACT_BATCH on a CPU, EXTRACT_BATCH_GPU
    else), as float32 numpy (N, d).

    Inference mode (no autograd record) and each batch's output copied into one preallocated array:
    a batch's activations are freed before the next runs, and no list of outputs is concatenated."""
    batch = batch or (EXTRACT_BATCH if torch.device(device).type == "cpu" else EXTRACT_BATCH_GPU)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for s in range(0, images.shape[0], batch):
            f = extractor(images[s:s + batch].to(device)).float().cpu().numpy()
            if out is None:
                out = np.empty((images.shape[0], *f.shape[1:]), dtype=np.float32)
            out[s:s + f.shape[0]] = f
            del f
    if out is None:
        raise ValueError("extract: no images")
    return out


def resolve_url(url: str, root: str, resolution: int | None, channels: int) -> str:
    """Shard URL for `url`; a `builtin:` set is generated once under `root` (as jobs does for training)."""
    if is_builtin(url):
        if resolution is None:
            raise ValueError(f"data.resolution is needed to render the built-in set {url}")
        return ensure_builtin(url, root, resolution, channels)
    return url


def search_positions(url: str, max_images: int | None, holdout: Holdout = None) -> Positions | None:
    """What the search reads: the training share (the `data.holdout` split left out, as training
    does: held-out images judge models and must not shape the augmentations), all of it or a
    seeded draw of `max_images` (never the first N, which follow the source's order, e.g. one
    class). None: every image of every shard."""
    training = training_share(url, holdout)[1] if holdout is not None else None
    if max_images is None:
        return training
    if training is None:
        return evaluation_positions(url, max_images, seed=ORIGINALS_SEED)
    pool = [(shard, int(i)) for shard, idx in enumerate(training) for i in idx]
    rng = np.random.default_rng(ORIGINALS_SEED)
    picked = [pool[j] for j in rng.choice(len(pool), size=min(max_images, len(pool)), replace=False)]
    return [np.array(sorted(i for s, i in picked if s == shard), dtype=np.int64) for shard in range(len(training))]


def load_originals(url: str, channels: int, extractor: str | torch.nn.Module = "randconv",
                   weights_path: str | None = None, max_images: int | None = None,
                   device: str | torch.device = "cpu",
                   progress: Callable[[str], None] | None = None, holdout: Holdout = None) -> Originals:
    """Read the images of a shard set once (see `search_positions`: the held-out split never),
    and extract features."""
    card = read_card(url)
    if card.channels != channels:
        raise ValueError(f"data.train {url} holds {card.channels}-channel images, the spec says data.channels={channels}")
    images, keys = [], []
    positions = search_positions(url, max_images, holdout)
    for batch in iterate_once(url, BATCH, positions=positions):
        images.append(batch["image"])
        keys.extend(batch["__key__"])
    if not images or sum(b.shape[0] for b in images) < 2:
        raise ValueError(f"data.train {url}: a search needs at least 2 readable images")
    pixels = torch.cat(images)
    net = make_extractor(extractor, weights_path) if isinstance(extractor, str) else extractor
    net = net.to(device).eval()
    if progress:
        progress(f"originals: {pixels.shape[0]} images {tuple(pixels.shape[1:])} from {url}; extracting {net.name} features")
    return Originals(images=pixels, keys=keys, features=extract(net, pixels, device), extractor_name=net.name,
                     channels=channels, url=url, fingerprint=getattr(card, "fingerprint", "") or "")


def from_tensors(images: torch.Tensor, keys: list[str] | None, extractor: str | torch.nn.Module = "randconv",
                 weights_path: str | None = None, device: str | torch.device = "cpu") -> Originals:
    """Originals from images already in memory (tests, callers that hold the data)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"expected uint8 NCHW images, got {images.dtype} {tuple(images.shape)}")
    keys = list(keys) if keys is not None else [f"{i:06d}" for i in range(images.shape[0])]
    if len(keys) != images.shape[0] or len(set(keys)) != len(keys):
        raise ValueError("need one distinct key per image")
    net = make_extractor(extractor, weights_path) if isinstance(extractor, str) else extractor
    net = net.to(device).eval()
    return Originals(images=images.contiguous(), keys=keys, features=extract(net, images, device),
                     extractor_name=net.name, channels=int(images.shape[1]))
