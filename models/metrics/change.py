"""F1 of the change mask, for past -> future synthesis.

A pixel has *changed* when its intensity, averaged over channels, moved by more than
`CHANGE_THRESHOLD` of the full range between the past image and a future image. The true
change map compares past with the real future, the predicted one past with the generated
future; F1 = 2TP / (2TP + FP + FN) is counted over all pixels of all images (micro-average,
torchmetrics' BinaryF1Score; 0 when neither map has a changed pixel). It scores whether the
model changed the right places, whatever it painted there.
"""
from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import BinaryF1Score

CHANGE_THRESHOLD = 0.1   # of the full intensity range (25.5 of 255)


def change_map(past: Tensor, future: Tensor, threshold: float = CHANGE_THRESHOLD) -> Tensor:
    """uint8 NCHW past and future -> bool (N, H, W): where the mean absolute change exceeds the threshold."""
    if past.shape != future.shape:
        raise ValueError(f"past {tuple(past.shape)} and future {tuple(future.shape)} differ in shape")
    return (future.float() - past.float()).abs().mean(dim=1) > threshold * 255


class ChangeF1:
    def __init__(self, threshold: float = CHANGE_THRESHOLD):
        self.threshold = threshold
        # Local: evaluation runs on rank 0 alone (see models.metrics.suite).
        self.metric = BinaryF1Score(sync_on_compute=False, dist_sync_on_step=False)

    def to(self, device) -> "ChangeF1":
        self.metric = self.metric.to(device)
        return self

    def update(self, past: Tensor, fake: Tensor, real: Tensor) -> None:
        device = self.metric.device
        self.metric.update(change_map(past, fake, self.threshold).flatten().int().to(device),
                           change_map(past, real, self.threshold).flatten().int().to(device))

    def compute(self) -> float:
        return float(self.metric.compute())
