"""StyleGAN2's demodulation runs in fp32 under autocast: its coefficients under bf16 autocast equal
an independent fp64 computation to fp32 accuracy (a bf16 matmul would be off by ~1e-3)."""
from __future__ import annotations

import torch

from models.nets.stylegan2 import demodulation, modulated_conv2d


def reference(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(Σ_{i,k} (s_i · w_oik)² + 1e-8) per sample n and output o, by the definition, in fp64."""
    w, s = weight.double(), styles.double()
    modulated = w[None] * s[:, None, :, None, None]                   # (N, out, in, k, k)
    return (modulated.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()


def test_demodulation_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    weight, styles = torch.randn(64, 96, 3, 3, generator=g), torch.randn(5, 96, generator=g) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = demodulation(weight, styles)
        plain_matmul = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()
    expected = reference(weight, styles)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=0)
    # What autocast does to the same matmul left alone: bf16, far off. The test could fail.
    assert plain_matmul.dtype == torch.bfloat16
    assert not torch.allclose(plain_matmul.double(), expected, rtol=1e-5, atol=0)


def test_modulated_conv_under_bf16_scales_by_the_fp32_coefficients():
    g = torch.Generator().manual_seed(1)
    x, weight, styles = torch.randn(2, 8, 6, 6, generator=g), torch.randn(4, 8, 3, 3, generator=g), \
        torch.randn(2, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = modulated_conv2d(x, weight, styles, demodulate=True)
        undemodulated = modulated_conv2d(x, weight, styles, demodulate=False)
    d = reference(weight, styles).to(undemodulated.dtype)
    torch.testing.assert_close(y, undemodulated * d[:, :, None, None], rtol=0, atol=0)
