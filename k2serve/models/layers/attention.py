"""Attention over a KV cache, kept behind one small interface.

Model code never owns its cache: every attention layer calls
``ctx.attend(layer_idx, q, k, v, scale)`` with the projected (and rotated) q/k/v of the
tokens in this step, flattened over all sequences of the batch. The context stores k/v
in whatever cache the engine uses and returns the attention output. This keeps model
files free of batching and caching concerns; the engine swaps contexts (contiguous
per-sequence caches now, a paged pool later) without touching the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q: [N, n_heads, head_dim]; k, v: [N, n_kv_heads, head_dim] -> [N, n_heads, head_dim]."""
        ...


class SequenceKVCache:
    """Contiguous K/V storage of one sequence for every layer, grown on demand."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.shape_tail = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.k = [torch.empty(initial_capacity, *self.shape_tail, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(initial_capacity, *self.shape_tail, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # tokens whose k/v are stored (all layers)

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.k[0].shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, capacity * 2)
        for layer in range(self.num_layers):
            for store in (self.k, self.v):
                grown = torch.empty(new_capacity, *self.shape_tail, dtype=self.dtype)
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

    def attend(self, layer_idx, q, k, v, scale):
        out = torch.empty_like(q)
        offset = 0
        for seg in self.segments:
            end_pos = seg.start + seg.count
            cache = seg.cache
            cache.ensure_capacity(end_pos)
            sl = slice(offset, offset + seg.count)
            cache.k[layer_idx][seg.start:end_pos] = k[sl]
            cache.v[layer_idx][seg.start:end_pos] = v[sl]
            keys = cache.k[layer_idx][:end_pos]
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
    t, n_heads, _ = q.shape
    n_kv = keys.shape[1]
    if n_heads != n_kv:
        repeat = n_heads // n_kv
        keys = keys.repeat_interleave(repeat, dim=1)
        values = values.repeat_interleave(repeat, dim=1)
    qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    if t == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        s = keys.shape[0]
        q_pos = torch.arange(start, start + t).unsqueeze(1)
        k_pos = torch.arange(s).unsqueeze(0)
        mask = k_pos <= q_pos
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
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
    """Attention over a paged KV pool (one [slots, kv_heads, head_dim] K and V tensor per layer).

    The step's rows are laid out as `num_decode` single-token decodes first, then prefill
    chunks. Each layer writes its new k/v into their slots with one `index_copy_`; the
    decodes attend together through one gather of their (padded) slot tables, the prefill
    chunks one by one with a causal mask.
    """

    k_pool: list[torch.Tensor]
    v_pool: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [N] cache slot of each row
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [B, S_max] slots, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, S_max] True where a slot is real
    prefills: list[PrefillRun] = field(default_factory=list)

    def attend(self, layer_idx, q, k, v, scale):
        k_pool, v_pool = self.k_pool[layer_idx], self.v_pool[layer_idx]
        k_pool.index_copy_(0, self.slot_mapping, k.to(k_pool.dtype))
        v_pool.index_copy_(0, self.slot_mapping, v.to(v_pool.dtype))
        out = torch.empty_like(q)
        b = self.num_decode
        if b:
            keys = k_pool[self.decode_slots].transpose(1, 2).to(q.dtype)  # [B, KV, S, D]
            values = v_pool[self.decode_slots].transpose(1, 2).to(q.dtype)
            o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys, values,
                                               attn_mask=self.decode_mask, scale=scale,
                                               enable_gqa=True)
            out[:b] = o.squeeze(2)
        for run in self.prefills:
            rows = slice(run.q_start, run.q_start + run.q_count)
            out[rows] = _causal_attention(q[rows], k_pool[run.slots].to(q.dtype),
                                          v_pool[run.slots].to(q.dtype), run.start_pos, scale)
        return out
