"""Attention over a KV cache, kept behind one small interface.

Model code never owns its cache: every attention layer calls
``ctx.attend(layer_idx, q, k, v, scale)`` with the projected (and rotated) q/k/v of the
tokens in this step, flattened over all sequences of the batch. The context stores k/v
in whatever cache the engine uses and returns the attention output. This keeps model
files free of batching and caching concerns; the engine swaps contexts (contiguous
per-sequence caches now, a paged pool later) without touching the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KVCacheSpec:
    """What a model keeps in the KV cache per token per layer.

    Most models store keys and values apart. MLA (DeepSeek-V3 / Kimi K2, absorbed form)
    caches one latent vector per token (kv_lora_rank + rope dims) that is the key, and
    whose first `value_dim` (= kv_lora_rank) entries are the value: `values_in_keys=True`,
    and no value tensor is stored at all.
    """

    num_layers: int
    num_kv_heads: int
    key_dim: int
    value_dim: int
    values_in_keys: bool = False


class AttentionContext(Protocol):
    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
        scale: float, value_dim: int | None = None
    ) -> torch.Tensor:
        """q: [N, n_heads, key_dim]; k: [N, n_kv_heads, key_dim]; v: [N, n_kv_heads, value_dim],
        or None with `value_dim` when the values are keys[..., :value_dim] (MLA)
        -> [N, n_heads, value_dim]."""
        ...


class SequenceKVCache:
    """Contiguous K/V storage of one sequence for every layer, grown on demand."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, initial_capacity: int = 256,
                 value_dim: int | None = None):
        """value_dim: the size of stored values (default head_dim); 0 stores no values (MLA)."""
        self.num_layers = num_layers
        self.k_tail = (num_kv_heads, head_dim)
        self.v_tail = (num_kv_heads, head_dim if value_dim is None else value_dim)
        self.dtype = dtype
        self.k = [torch.empty(initial_capacity, *self.k_tail, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(initial_capacity, *self.v_tail, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # tokens whose k/v are stored (all layers)

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.k[0].shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, capacity * 2)
        for layer in range(self.num_layers):
            for store, tail in ((self.k, self.k_tail), (self.v, self.v_tail)):
                grown = torch.empty(new_capacity, *tail, dtype=self.dtype)
                grown[:capacity] = store[layer]
                store[layer] = grown

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


@dataclass
class Segment:
    """A run of consecutive tokens of one sequence inside the flattened batch."""

    cache: SequenceKVCache
    start: int  # position of the first token of the run (== tokens already cached)
    count: int


@dataclass
class ContiguousAttention:
    """Attention over per-sequence contiguous caches; one segment per sequence in the step.

    Tokens of the step are laid out segment after segment, in the order given.
    """

    segments: list[Segment] = field(default_factory=list)

    def attend(self, layer_idx, q, k, v, scale, value_dim=None):
        out = q.new_empty(*q.shape[:2], v.shape[-1] if v is not None else value_dim)
        offset = 0
        for seg in self.segments:
            end_pos = seg.start + seg.count
            cache = seg.cache
            cache.ensure_capacity(end_pos)
            sl = slice(offset, offset + seg.count)
            cache.k[layer_idx][seg.start:end_pos] = k[sl]
            keys = cache.k[layer_idx][:end_pos]
            if v is None:
                values = keys[..., :value_dim]
            else:
                cache.v[layer_idx][seg.start:end_pos] = v[sl]
                values = cache.v[layer_idx][:end_pos]
            out[sl] = _causal_attention(q[sl], keys, values, seg.start, scale)
            offset += seg.count
        return out

    def commit(self) -> None:
        """Record the step's tokens as cached (call once after the forward pass)."""
        for seg in self.segments:
            seg.cache.length = seg.start + seg.count


def _causal_attention(q, keys, values, start, scale):
    """q: [T, H, D] at positions start..start+T-1; keys/values: [S, KV, D], S = start+T."""
    t = q.shape[0]
    qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    mask = None
    if t > 1:
        q_pos = torch.arange(start, start + t).unsqueeze(1)
        mask = torch.arange(keys.shape[0]).unsqueeze(0) <= q_pos
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


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
            out[rows] = _causal_attention(q[rows], keys, values, run.start_pos, scale)
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


def rotate_qkv(qkv, cos, sin_signed, num_heads, head_dim):
    """Split a fused qkv projection's output [N, (H + 2 KV) * D] into RoPE'd q [N, H, D],
    k [N, KV, D] and v [N, KV, D], float32. cos, sin_signed: [N, 1, D]; ``sin_signed`` is sin
    with its first half negated, so that rotate_half(t) * sin == t.roll(D / 2) * sin_signed."""
    n = qkv.shape[0]
    qk_size = qkv.shape[1] - (qkv.shape[1] - num_heads * head_dim) // 2
    qk = qkv[:, :qk_size].view(n, -1, head_dim)
    qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, -1), sin_signed)  # float32 (cos is)
    v = qkv[:, qk_size:].view(n, -1, head_dim).float()
    return qk[:, :num_heads], qk[:, num_heads:], v
