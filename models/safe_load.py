"""Loading torch files that storage hands back: tensors and plain data only.

A pickle may name any callable, so `torch.load(weights_only=False)` of a checkpoint lets anyone
who can write to run storage (a bucket) run code on every worker that resumes from it. Every
file orbitgen reads back (checkpoints, engine states, snapshots, backbone weights) goes through
`load_weights_only`: torch's restricted unpickler, plus the few classes of our own libraries
that their files hold and that carry data only (DeepSpeed's ZeRO optimizer states hold its loss
scaler, its ZeRO-stage enum and fragment addresses: plain records).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch


class UntrustedFileError(pickle.UnpicklingError):
    """A file that holds Python objects beyond tensors and plain data: refused, nothing run."""


def deepspeed_safe_classes() -> list[type]:
    """What DeepSpeed writes into its checkpoints besides tensors and plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, *, map_location: Any = "cpu", allow: Sequence[type] = ()) -> Any:
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        what = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(e).__name__)
        raise UntrustedFileError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data, which could "
            f"run code ({what.strip()[:200]}). orbitgen never writes such files: was it replaced in storage?") from None
