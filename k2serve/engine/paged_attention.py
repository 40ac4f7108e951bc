"""The engine's attention context: one step's attention over the paged KV pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from k2serve.models.layers.attention import causal_attention, rotate_qkv
from k2serve.models.layers.int4_linear import DenseRows


@dataclass
class PrefillRun:
    """A chunk of one sequence's tokens computed in this step (more than a single decode)."""

    q_start: int  # first row of the chunk in the flattened step
    q_count: int
    start_pos: int  # position of the chunk's first token
    slots: torch.Tensor  # cache slots of positions 0 .. start_pos + q_count - 1


@dataclass
class PagedAttention:
    """Attention over a paged KV pool (one [slots, kv_heads, head_dim] K and V tensor per layer,
    float32 or bfloat16; attention computes in q's dtype over the stored values, so every
    path, prefill chunks included, sees the same rounded K/V).

    The step's rows are laid out as `num_decode` single-token decodes first, then prefill
    chunks. Each layer writes its new k/v into their slots with one `index_copy_`. The
    decodes attend together: with the native kernel (`decode_kernel`) straight out of the
    pool through their block tables, else through one gather of their (padded) slot tables;
    the prefill chunks one by one with a causal mask.

    ``dense_rows`` is the step's dense-row plan for the model's quantized linears (see
    ``AttentionContext``), set by the engine.
    """

    k_pool: list[torch.Tensor]
    v_pool: list[torch.Tensor] | None  # None: values are the keys' leading dims (MLA)
    slot_mapping: torch.Tensor  # [N] cache slot of each row
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [B, S_max] slots, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, S_max] True where a slot is real
    prefills: list[PrefillRun] = field(default_factory=list)
    # native decode path: k2serve.native's paged_decode_attention, with per-decode block
    # tables [B, max_blocks] and lengths [B] (tokens attended, the new one included)
    decode_kernel: Callable | None = None
    decode_rotary_kernel: Callable | None = None  # RoPE + KV write + decode attention
    decode_block_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    block_size: int = 0
    dense_rows: DenseRows | None = None

    @property
    def decode_only(self) -> bool:
        """Every row of the step is a decode row (one token of a sequence attending to its
        cache) that the native RoPE + KV write + attention kernel runs, and no linear follows
        a dense-row plan: what a model's native decode stack needs."""
        return (self.decode_rotary_kernel is not None and not self.dense_rows
                and self.num_decode == self.slot_mapping.shape[0])

    def attend(self, layer_idx, q, k, v, scale, value_dim=None):
        k_pool = self.k_pool[layer_idx]
        k_pool.index_copy_(0, self.slot_mapping, k.to(k_pool.dtype))
        if v is not None:
            v_pool = self.v_pool[layer_idx]
            v_pool.index_copy_(0, self.slot_mapping, v.to(v_pool.dtype))
            value_dim = v.shape[-1]
        else:
            v_pool = k_pool[..., :value_dim]

        def gather(slots):
            keys = k_pool[slots].to(q.dtype)
            values = keys[..., :value_dim] if v is None else v_pool[slots].to(q.dtype)
            return keys, values

        out = q.new_empty(*q.shape[:2], value_dim)
        b = self.num_decode
        if b and self.decode_kernel is not None and q.dtype == torch.float32:
            out[:b] = self.decode_kernel(q[:b], k_pool, v_pool, self.decode_block_tables,
                                         self.decode_lens, self.block_size, scale)
        elif b:
            keys, values = gather(self.decode_slots)  # [B, S, KV, D]
            o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys.transpose(1, 2),
                                               values.transpose(1, 2), attn_mask=self.decode_mask,
                                               scale=scale, enable_gqa=True)
            out[:b] = o.squeeze(2)
        for run in self.prefills:
            rows = slice(run.q_start, run.q_start + run.q_count)
            keys, values = gather(run.slots)
            out[rows] = causal_attention(q[rows], keys, values, run.start_pos, scale)
        return out

    def attend_rotary(self, layer_idx, qkv, cos, sin_signed, num_heads, num_kv_heads, head_dim,
                      scale):
        """``attend`` from a fused qkv projection's output [N, (H + 2 KV) * D] (RoPE not yet
        applied): the decode rows in one native call (RoPE, KV write, attention), the other
        rows by ``rotate_qkv`` + ``attend``. -> [N, H, D] float32."""
        b = self.num_decode if self.decode_rotary_kernel is not None else 0
        if not b:
            return self.attend(layer_idx, *rotate_qkv(qkv, cos, sin_signed, num_heads, head_dim),
                               scale)
        n = qkv.shape[0]
        if n == b:  # a pure decode step: no slicing, no copy into an output (~10 us a layer)
            return self.decode_rotary_kernel(
                qkv, cos[:, 0], sin_signed[:, 0], self.k_pool[layer_idx], self.v_pool[layer_idx],
                self.slot_mapping, self.decode_block_tables, self.decode_lens, self.block_size,
                scale, num_heads, num_kv_heads)
        out = torch.empty(n, num_heads, head_dim)
        out[:b] = self.decode_rotary_kernel(
            qkv[:b], cos[:b, 0], sin_signed[:b, 0], self.k_pool[layer_idx], self.v_pool[layer_idx],
            self.slot_mapping[:b], self.decode_block_tables, self.decode_lens, self.block_size,
            scale, num_heads, num_kv_heads)
        if n > b:  # prefill chunks: their rows only, as a context without the decodes
            rest = PagedAttention(self.k_pool, self.v_pool, self.slot_mapping[b:],
                                  prefills=[PrefillRun(r.q_start - b, r.q_count, r.start_pos, r.slots)
                                            for r in self.prefills])
            out[b:] = rest.attend(layer_idx, *rotate_qkv(qkv[b:], cos[b:], sin_signed[b:],
                                                         num_heads, head_dim), scale)
        return out
