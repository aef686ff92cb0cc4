"""SSIM per image, as Wang et al. define it and scikit-image computes it.

torchmetrics computes the local SSIM map (Gaussian window 11, σ 1.5, K1 0.01, K2 0.03) but then
averages it over the whole image, borders included, where the window hangs over reflected
padding; Wang et al.'s reference code and scikit-image average only where the window fits
(5 pixels in from each border). We take torchmetrics' map and average it the reference way,
so the numbers agree with scikit-image. Differentiable (a training loss too).
"""
from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

WINDOW = 11
SIGMA = 1.5


def ssim(fake: Tensor, real: Tensor, data_range: float) -> Tensor:
    """(N,) mean SSIM of each image pair (float NCHW, values spanning `data_range`), channels averaged."""
    pad = (WINDOW - 1) // 2
    if min(real.shape[-2:]) <= 2 * pad:
        raise ValueError(f"SSIM with an {WINDOW}x{WINDOW} window needs images larger than {2 * pad}, "
                         f"got {tuple(real.shape[-2:])}")
    _, full = structural_similarity_index_measure(fake, real, data_range=data_range, kernel_size=WINDOW, sigma=SIGMA,
                                                  return_full_image=True)
    return full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))
