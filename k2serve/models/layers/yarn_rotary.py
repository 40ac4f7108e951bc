"""RoPE for DeepSeek-V3 / Kimi K2: YaRN frequencies and the interleaved pair layout.

Numerics follow transformers (``_compute_yarn_parameters`` and
``apply_rotary_pos_emb_interleave``): YaRN blends original and factor-divided frequencies
over a linear ramp, and multiplies cos/sin by an attention factor
(mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1.0 for K2). The extra
mscale(factor, mscale_all_dim)^2 of the softmax scale lives in the config (``softmax_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from k2serve.models.deepseek_config import yarn_mscale


def yarn_inv_freq(dim: int, theta: float, scaling: dict, factor: float) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2], attention factor applied to cos and sin)."""
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dim index whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)

    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: divide it by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class DeepseekRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float, scaling: dict | None, factor: float | None):
        super().__init__()
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_factor = 1.0
        else:
            inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, scaling, factor)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, 1, dim/2] (one angle per rotated pair; broadcast over heads)."""
        freqs = (positions.float()[:, None] * self.inv_freq[None, :])[:, None, :]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [N, heads, dim]; cos/sin [N, 1, dim/2].

    interleaved: pairs are (x0, x1), (x2, x3), ... and the result comes out de-interleaved
    (all first elements, then all second ones), as transformers does. q_pe and k_pe get the
    same permutation, so their dot products are those of DeepSeek's reference.
    Otherwise pairs are (x_i, x_{i+dim/2}) ("rotate_half").
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
