"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2) in the absorbed form.

Per token the cache holds one latent of kv_lora_rank + qk_rope_head_dim values (576 for
K2): the normalised c_kv, then the roped k_pe, shared by every head. Attention is then
MQA over that latent:

    q_lat_h  = q_nope_h @ W_UK_h               [kv_lora_rank]  (W_UK_h: [nope, kv_lora_rank])
    score_h  = scale * ([q_lat_h | q_pe_h] . latent)            == q_nope_h.k_nope_h + q_pe_h.k_pe
    o_lat_h  = softmax(score_h) @ latent[:kv_lora_rank]
    o_h      = o_lat_h @ W_UV_h                [v_head_dim]    (W_UV_h: [kv_lora_rank, v])

so the per-head keys and values of the reference (kv_b_proj applied to every cached token)
are never materialised. kv_b_proj ([H*(nope+v), kv_lora_rank] in the checkpoint) is split
at load time into ``w_uk`` [H, nope, kv_lora_rank] and ``w_uv`` [H, kv_lora_rank, v], the
operands of the two batched matmuls above.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.models.deepseek_config import DeepseekV3Config
from k2serve.models.layers.attention import AttentionContext
from k2serve.models.layers.linear import Linear, MergedLinear
from k2serve.models.layers.norm import RMSNorm
from k2serve.models.layers.yarn_rotary import apply_rotary

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.nope, self.rope, self.v_dim = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = c.kv_lora_rank, c.q_lora_rank
        self.interleaved = c.rope_interleave
        self.scale = c.softmax_scale()
        # Both projections of the layer input in one matmul: q (or its low-rank half) and kv_a.
        q_name, q_size = ("q_proj", c.num_heads * c.qk_head_dim) if c.q_lora_rank is None else ("q_a_proj", c.q_lora_rank)
        self.q_size = q_size
        self.fused_qkv_a_proj = MergedLinear(c.hidden_size, {q_name: q_size, "kv_a_proj_with_mqa": c.latent_dim}, dtype)
        if c.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(c.q_lora_rank, c.num_heads * c.qk_head_dim, dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.w_uk = nn.Parameter(torch.empty(c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank, dtype=dtype),
                                 requires_grad=False)
        self.w_uv = nn.Parameter(torch.empty(c.num_heads, c.kv_lora_rank, c.v_head_dim, dtype=dtype),
                                 requires_grad=False)
        self.o_proj = Linear(c.num_heads * c.v_head_dim, c.hidden_size, dtype)

    def load_kv_b_proj(self, tensor: torch.Tensor) -> None:
        """[H*(nope+v), kv_lora_rank] (shape checked by the caller) -> w_uk [H, nope, L], w_uv [H, L, v]."""
        per_head = tensor.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_uk.data.copy_(per_head[:, :self.nope])
        self.w_uv.data.copy_(per_head[:, self.nope:].transpose(1, 2))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        n = x.shape[0]
        q, kv = self.fused_qkv_a_proj(x).split([self.q_size, self.kv_lora_rank + self.rope], dim=-1)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(n, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope], dim=-1)

        q_pe = apply_rotary(q_pe, cos, sin, self.interleaved)
        k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin, self.interleaved)  # [n, 1, rope]
        latent = torch.cat((self.kv_a_layernorm(c_kv).unsqueeze(1), k_pe), dim=-1)  # [n, 1, L + rope]

        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [n, H, L]
        q_abs = torch.cat((q_lat, q_pe), dim=-1)  # [n, H, L + rope]
        o_lat = attn.attend(self.layer_idx, q_abs, latent, None, self.scale, value_dim=self.kv_lora_rank)
        out = torch.bmm(o_lat.transpose(0, 1), self.w_uv)  # [H, n, v]
        return self.o_proj(out.transpose(0, 1).reshape(n, self.num_heads * self.v_dim))
