"""One fake per step for the two-player GANs (DCGAN, pix2pix and its cGANs): phase G makes the
fake with its graph, phase D of the same step learns from exactly those images, detached. The
references make one fake per step and use it in both updates; the loop trains one network per
phase, so the fake is handed from one phase to the next here."""
from __future__ import annotations

import weakref
from collections import deque

import torch

from models.family import StepContext


class StepFakes:
    """The detached fakes of this step's G phase, one per micro-batch, handed in order to the D
    phase that follows. Lives only inside a step (no checkpoint holds it): each G phase (a new
    StepContext) starts a fresh list, and D takes each fake once."""

    def __init__(self, family: str):
        self.family = family
        self._fakes: deque[torch.Tensor] = deque()
        self._step: int | None = None
        self._phase: weakref.ref | None = None   # the G phase's context; weak: nothing outlives the step

    def put(self, ctx: StepContext, fake: torch.Tensor) -> None:
        if self._phase is None or self._phase() is not ctx:   # a new G phase
            self._fakes.clear()
            self._phase, self._step = weakref.ref(ctx), ctx.step
        self._fakes.append(fake)

    def take(self, ctx: StepContext, n: int) -> torch.Tensor:
        if not self._fakes or self._step != ctx.step:
            raise RuntimeError(
                f"{self.family}: phase 'D' of step {ctx.step} found no fake of this step's phase 'G'. The D phase "
                "learns from the fakes the G phase made (one generator forward per step): the phases must run "
                "in the order phases() gives, G then D, over the same micro-batches")
        fake = self._fakes.popleft()
        if fake.shape[0] != n:
            raise RuntimeError(f"{self.family}: phase 'D' got a micro-batch of {n} but phase 'G' made {fake.shape[0]} "
                               "fakes: both phases must see the same micro-batches in the same order")
        return fake
