"""The metrics a family is judged by, behind one interface.

`MetricSuite(family.metrics, extractor=..., pr_extractor=..., device=...)`, then
`update(fake=..., real=..., cond=...)` with uint8 NCHW batches, then `compute()` -> {name: value}
and `params()` -> what the values were computed with (log both). Names:

  fid    Fréchet distance in the extractor's feature space (distribution metric: `fake` and
         `real` may come in separate calls, and need not be pairs)
  kid    kernel distance (unbiased MMD², cubic kernel) in the extractor's feature space (`models.
         metrics.kid`; distribution metric, like fid)
  pr     improved precision and recall (k = 3), logged as `precision` and `recall`, in the feature
         space of `pr_extractor` (VGG-16: published scale), else of the extractor (`models.metrics.
         precision_recall`; distribution metric, like fid)
  l1     mean |fake - real|, intensities scaled to [0, 1]                          (paired)
  mse    mean (fake - real)^2, intensities scaled to [0, 1]                        (paired)
  psnr   peak signal-to-noise ratio in dB, per image, then averaged (torchmetrics) (paired)
  ssim   structural similarity per image, then averaged (`models.metrics.ssim`)   (paired)
  lpips  LPIPS with its published weights, from the local file `lpips_weights` (`models.metrics.
         lpips`); without that file, a family's `lpips` is computed and logged as
         perceptual_randconv                                                     (paired)
  perceptual_randconv  LPIPS's structure on fixed random convolutions, uniform weights: its
         own scale, not comparable with published LPIPS (`models.metrics.perceptual`) (paired)
  f1     F1 of the change mask against `cond`, the past image (`models.metrics.change`) (paired)

Paired metrics compare fake[i] with real[i], so they need both in the same call.

Suites that saw disjoint parts of one evaluation (other processes) merge: `state()` on each,
`merge(state)` into one suite of the same configuration, in the order the parts come in a
single-process evaluation (`models.metrics.merge`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric
from torchmetrics.image import PeakSignalNoiseRatio

from models.metrics.change import CHANGE_THRESHOLD, ChangeF1
from models.metrics.fid import FrechetDistance
from models.metrics.kid import KernelDistance
from models.metrics.merge import merge_state, metric_state
from models.metrics.lpips import LPIPS
from models.metrics.perceptual import PerceptualDistance
from models.metrics.precision_recall import PrecisionRecall
from models.metrics.ssim import ssim

# Suites never synchronise on their own: a distributed or spread evaluation merges their states
# explicitly, in the order of one process (`state`/`merge`), on one rank or the driver, and a
# metric that synchronised at compute() would wait for ranks that never call it.
LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}

# torchmetrics metrics updated with (fake, real) scaled to [0, 1].
TORCHMETRICS: dict[str, Callable[[], Metric]] = {
    "l1": lambda: MeanAbsoluteError(**LOCAL),
    "mse": lambda: MeanSquaredError(**LOCAL),
    "psnr": lambda: PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3), **LOCAL),
}


class _Perceptual:
    """A perceptual distance network on (fake, real) in [0, 1]."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, f: Tensor, r: Tensor) -> Tensor:
        return self.net.to(f.device)(2 * f - 1, 2 * r - 1)   # it takes [-1, 1]


# Scores of each pair, (fake, real) scaled to [0, 1] -> (N,), averaged over all pairs; built
# with the LPIPS weights file (None when none was given).
PER_IMAGE: dict[str, Callable[[str | None], Callable[[Tensor, Tensor], Tensor]]] = {
    "ssim": lambda _: lambda f, r: ssim(f, r, data_range=1.0),
    "lpips": lambda weights: _Perceptual(LPIPS(weights)),
    "perceptual_randconv": lambda _: _Perceptual(PerceptualDistance()),
}
DISTRIBUTION = ("fid", "kid", "pr")   # fake and real need not come together, nor pair up
METRICS = (*DISTRIBUTION, *TORCHMETRICS, *PER_IMAGE, "f1")


def named_for_weights(names: Iterable[str], lpips_weights: str | None = None) -> tuple[str, ...]:
    """The metrics computed for `names`: `lpips` is published LPIPS only with its weights file;
    without one it is the random-convolution distance and named so (`perceptual_randconv`),
    which is what specs and families that asked for `lpips` got before the weights existed."""
    if lpips_weights:
        return tuple(names)
    out = tuple("perceptual_randconv" if n == "lpips" else n for n in names)
    return tuple(dict.fromkeys(out))   # a list that named both once has it once


def reported_names(names: Iterable[str], lpips_weights: str | None = None) -> tuple[str, ...]:
    """The names the values of these metrics are logged under ("pr" logs two; `lpips` without
    weights logs as perceptual_randconv)."""
    return tuple(r for n in named_for_weights(names, lpips_weights)
                 for r in (("precision", "recall") if n == "pr" else (n,)))


def all_reported_names() -> tuple[str, ...]:
    """Every name a value of a suite may be logged under, with LPIPS weights or without (what a
    reader of logged runs counts as an evaluation score)."""
    return tuple(dict.fromkeys(reported_names(METRICS) + reported_names(METRICS, lpips_weights="given")))


class MetricSuite:
    def __init__(self, names: Iterable[str], *, extractor: nn.Module | None = None,
                 pr_extractor: nn.Module | None = None, device: str | torch.device = "cpu",
                 lpips_weights: str | None = None):
        names = tuple(names)
        self.names = named_for_weights(names, lpips_weights)
        self.lpips_weights = lpips_weights
        self.lpips_renamed = "lpips" in names and "lpips" not in self.names   # asked for by its old name
        unknown = [n for n in self.names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        for name in ("fid", "kid"):
            if name in self.names and extractor is None:
                raise ValueError(f"{name} needs a feature extractor")
        if "pr" in self.names and extractor is None and pr_extractor is None:
            raise ValueError("pr needs a feature extractor (pr_extractor, or else extractor)")
        self.device = torch.device(device)
        self.extractor = extractor
        self.counts = {"fake": 0, "real": 0}
        self.fid = FrechetDistance(extractor, self.device) if "fid" in self.names else None
        self.kid = KernelDistance(extractor, self.device) if "kid" in self.names else None
        pr_space = extractor if pr_extractor is None else pr_extractor
        self.pr = PrecisionRecall(pr_space, self.device) if "pr" in self.names else None
        self.torchmetrics = {n: TORCHMETRICS[n]().to(self.device) for n in self.names if n in TORCHMETRICS}
        self.per_image = {n: (PER_IMAGE[n](lpips_weights), MeanMetric(**LOCAL).to(self.device))
                          for n in self.names if n in PER_IMAGE}
        self.f1 = ChangeF1().to(self.device) if "f1" in self.names else None
        self.paired = [n for n in self.names if n not in DISTRIBUTION]

    @torch.no_grad()
    def update(self, *, fake: Tensor | None = None, real: Tensor | None = None, cond: Tensor | None = None) -> None:
        for side, x in (("fake", fake), ("real", real)):
            if x is not None and (x.dtype != torch.uint8 or x.dim() != 4):
                raise TypeError(f"{side} must be uint8 NCHW images, got {x.dtype} {tuple(x.shape)}")
        if self.paired and (fake is None or real is None or fake.shape != real.shape):
            raise ValueError(f"{', '.join(self.paired)} compare pairs: pass fake and real images of the same shape together")
        for side, x in (("fake", fake), ("real", real)):
            if x is not None:
                self.counts[side] += x.shape[0]
                self._update_feature_metrics(x, real=side == "real")
        if not self.paired:
            return
        f, r = (x.to(self.device, torch.float32) / 255.0 for x in (fake, real))
        for metric in self.torchmetrics.values():
            metric.update(f, r)
        for score, mean in self.per_image.values():
            mean.update(score(f, r))
        if self.f1 is not None:
            if cond is None or cond.shape != real.shape:
                raise ValueError(f"f1 needs `cond`, the past image, shaped like the images; got "
                                 f"{None if cond is None else tuple(cond.shape)}")
            self.f1.update(cond, fake, real)

    def _update_feature_metrics(self, x: Tensor, *, real: bool) -> None:
        """fid, kid and pr in one feature space share one extractor pass per batch."""
        features: dict[int, Tensor] = {}
        for metric in (self.fid, self.kid, self.pr):
            if metric is not None and x.shape[0]:
                key = id(metric.extractor)
                if key not in features:
                    features[key] = metric.extract(x)
                metric.update_features(features[key], real=real)

    def compute(self) -> dict[str, float]:
        """{name: value}; "pr" gives two values, `precision` and `recall`."""
        out = {}
        for name in self.names:
            if name == "fid":
                out[name] = self.fid.compute()
            elif name == "kid":
                out[name] = self.kid.compute()
            elif name == "pr":
                out |= self.pr.compute()
            elif name == "f1":
                out[name] = self.f1.compute()
            elif name in self.per_image:
                out[name] = float(self.per_image[name][1].compute())
            else:
                out[name] = float(self.torchmetrics[name].compute())
        return out

    def metrics(self) -> list[Metric]:
        """The torchmetrics objects inside (all local: none synchronises across processes)."""
        out = list(self.torchmetrics.values()) + [mean for _, mean in self.per_image.values()]
        out += [self.fid.metric] if self.fid is not None else []
        out += [store.metric for store in (self.kid, self.pr) if store is not None]
        return out + ([self.f1.metric] if self.f1 is not None else [])

    def feature_metrics(self) -> list:
        """fid, kid and pr, those computed."""
        return [m for m in (self.fid, self.kid, self.pr) if m is not None]

    def state(self) -> dict:
        """What this suite has seen, on the CPU and picklable: `merge` adds it to another suite."""
        return {"counts": dict(self.counts), "feature_counts": [dict(m.counts) for m in self.feature_metrics()],
                "metrics": [metric_state(m) for m in self.metrics()]}

    def merge(self, state: dict) -> None:
        """Adds the `state()` of a suite of the same configuration, as if its updates came after
        this suite's own (KID's value depends on the order of the features)."""
        for side, n in state["counts"].items():
            self.counts[side] += n
        for metric, counts in zip(self.feature_metrics(), state["feature_counts"], strict=True):
            for side, n in counts.items():
                metric.counts[side] += n
        for metric, incoming in zip(self.metrics(), state["metrics"], strict=True):
            merge_state(metric, incoming)

    def params(self) -> dict[str, str]:
        """What the numbers were computed with (MLflow params)."""
        p = {"eval_metrics": ",".join(self.names), "eval_fake_images": str(self.counts["fake"]),
             "eval_real_images": str(self.counts["real"])}
        if self.fid is not None:
            p |= {"fid_extractor": self.extractor.name, "fid_num_samples": str(self.counts["fake"])}
        if self.kid is not None:
            p |= {"kid_extractor": self.kid.extractor.name, "kid_subsets": str(self.kid.subsets),
                  "kid_subset_size": str(min(self.kid.subset_size, *self.counts.values()))}
        if self.pr is not None:
            p |= {"pr_extractor": self.pr.extractor.name, "pr_k": str(self.pr.k)}
        if "lpips" in self.names:
            p["lpips_network"] = self.per_image["lpips"][0].net.name
        if "perceptual_randconv" in self.names:
            p["perceptual_randconv_network"] = PerceptualDistance.name
        if self.lpips_renamed:
            p["perceptual_randconv_note"] = ("asked for as lpips; without LPIPS weights (eval.lpips_weights) it is "
                                             "LPIPS's structure on random convolutions, not comparable with LPIPS")
        if self.f1 is not None:
            p["f1_change_threshold"] = str(CHANGE_THRESHOLD)
        return p
