"""Did a run learn? The untrained generator's scores beside the trained one's (same evaluation
code, extractor and seeds as training's), and one picture of real images beside samples.
`orbitgen quickstart` ends with it; benchmarks/learning.py records it for every ready spec."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_shards.preview import image_grid
from data_shards.storage import filesystem, join
from data_shards.stream import iterate_once
from jobs.eval.core import EvalSettings, evaluate, preview
from jobs.spec import JobSpec
from models.family import Family
from models.images import nchw_to_nhwc_numpy
from models.snapshot import SNAPSHOT, load_snapshot

GRID_IMAGES = 64
GAP = 8   # white pixels between the grid of reals and the grid of samples


def untrained_sampler(spec: JobSpec) -> tuple[Family, nn.Module]:
    """The run's sampler before its first step: the weights `jobs.train.loop.build_training` starts
    from (the same seed before the same build)."""
    family = spec.make_family()
    torch.manual_seed(spec.train.seed)
    return family, family.build()[family.sampler_role]


def trained_sampler(checkpoint: str) -> tuple[Family, nn.Module]:
    """The sampler saved in a checkpoint folder (local or object store)."""
    fs, path = filesystem(join(checkpoint, SNAPSHOT))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SNAPSHOT
        fs.get(path, str(local))
        family, sampler, _ = load_snapshot(local)
    return family, sampler


def scores(spec: JobSpec, family: Family, sampler: nn.Module, data_url: str, device: torch.device) -> dict[str, float]:
    """The spec's evaluation, as the worker runs it at a checkpoint."""
    out, _ = evaluate(family, sampler.to(device), EvalSettings.from_spec(spec, family), data_url=data_url,
                      device=device)
    return out


def reals_beside_samples(family: Family, sampler: nn.Module, data_url: str, *, seed: int,
                         device: torch.device, n: int = GRID_IMAGES) -> np.ndarray:
    """uint8 H×W×C: a grid of the set's first `n` images, white, the grid of `n` samples from
    `seed`. Conditional families: the preview's strips, which already put input, output and
    target side by side."""
    samples = preview(family, sampler, data_url=data_url, n=n, seed=seed, device=device)
    if family.conditional:
        return image_grid(samples, nrow=2)
    reals = nchw_to_nhwc_numpy(next(iterate_once(data_url, batch_size=n, limit=n, keys=("image",)))["image"])
    left, right = image_grid(reals), image_grid(samples)
    gap = np.full((left.shape[0], GAP, left.shape[2]), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Grey (1 band) or RGB (the first 3 bands) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[2] < 3 else image[..., :3]).save(path)
    return path


@dataclass
class LearningCheck:
    untrained: dict[str, float]
    trained: dict[str, float]
    picture: Path

    def ratio(self, metric: str = "fid") -> float | None:
        """trained / untrained: below 1 when the run learned (for metrics where lower is better)."""
        if metric not in self.trained or not self.untrained.get(metric):
            return None
        return self.trained[metric] / self.untrained[metric]


def check_run(spec: JobSpec, *, data_url: str, checkpoint: str, trained: dict[str, float], picture: Path,
              grid_seed: int) -> LearningCheck:
    """The untrained generator's scores (the trained ones come from the run), and the picture of
    reals beside the trained generator's samples written to `picture`."""
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    family, sampler = trained_sampler(checkpoint)
    save_png(reals_beside_samples(family, sampler.to(device), data_url, seed=grid_seed, device=device), picture)
    untrained_family, untrained = untrained_sampler(spec)
    before = scores(spec, untrained_family, untrained, data_url, device)
    return LearningCheck(untrained=before, trained={k: float(v) for k, v in trained.items() if k in before},
                         picture=picture)
