"""The diffusion UNet's attention lays q, k, v out for the fused kernels (unit stride in the last
dimension), and its output equals attention computed by the definition."""
from __future__ import annotations

import math

import torch

from models.nets.ddpm_unet import SelfAttention


def by_definition(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """x + proj(softmax(QᵀK/√c)·V) with Q, K, V the (c, hw) matrices of the 1x1 qkv conv, per sample."""
    n, c, h, w = x.shape
    qkv = attn.qkv(attn.norm(x)).reshape(n, 3, c, h * w).double()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                                # (n, c, hw)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (n, hw, hw)
    out = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
    return x.double() + attn.proj(out.float()).double()


def test_attention_matches_the_definition_in_both_layouts():
    torch.manual_seed(0)
    attn = SelfAttention(32)
    torch.nn.init.normal_(attn.proj.weight)   # zero-initialised: the residual alone would hide errors
    x = torch.randn(2, 32, 8, 8)
    expected = by_definition(attn, x)
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.no_grad():
            got = attn(x.contiguous(memory_format=layout))
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_q_k_v_have_unit_stride_in_their_last_dimension():
    attn = SelfAttention(16)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 16, 4, 4).contiguous(memory_format=layout)
        for t in attn.qkv_heads(x):
            assert t.shape == (2, 1, 16, 16) and t.stride(-1) == 1
