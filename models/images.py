"""Conversions between the two image conventions of orbitgen.

Storage, metrics and the registered model speak uint8 in [0, 255]; networks speak float in
[-1, 1] (the range of a Tanh output). Everything converts here, so the mapping is one formula.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_float(x_uint8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (any layout; NCHW by convention)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255]; values outside the range are clamped, then rounded."""
    scaled = (x.detach().to(torch.float32) + 1.0) * 127.5
    return scaled.clamp(0.0, 255.0).round().to(torch.uint8)


def nchw_to_nhwc_numpy(x_uint8: Tensor) -> np.ndarray:
    """uint8 NCHW tensor -> uint8 NHWC numpy array (what PIL and the registered model return)."""
    if x_uint8.dim() != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x_uint8.shape)}")
    return np.ascontiguousarray(x_uint8.detach().cpu().permute(0, 2, 3, 1).numpy())
