"""Attention over a KV cache, kept behind one small interface.

Model code never owns its cache: every attention layer calls
``ctx.attend(layer_idx, q, k, v, scale)`` with the projected (and rotated) q/k/v of the
tokens in this step, flattened over all sequences of the batch. The context stores k/v
in its cache and returns the attention output, so model files hold no batching or caching.
The engine's context is a paged pool shared by all sequences
(``k2serve.engine.paged_attention``); ``ContiguousAttention`` here keeps one contiguous cache
per sequence, for running a model directly (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from k2serve.models.layers.int4_linear import DenseRows


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
    """One step's attention over the KV cache, and the step's dense-row plan: the row runs
    whose quantized linears take their dense weight (``Int4Linear``'s ``dense_rows``; None:
    each layer picks its kernel by the step's row count)."""

    dense_rows: DenseRows | None

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
    dense_rows: DenseRows | None = None

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
            out[sl] = causal_attention(q[sl], keys, values, seg.start, scale)
            offset += seg.count
        return out

    def commit(self) -> None:
        """Record the step's tokens as cached (call once after the forward pass)."""
        for seg in self.segments:
            seg.cache.length = seg.start + seg.count


def causal_attention(q, keys, values, start, scale):
    """q: [T, H, D] at positions start..start+T-1; keys/values: [S, KV, D], S = start+T."""
    t = q.shape[0]
    qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
    mask = None
    if t > 1:
        q_pos = torch.arange(start, start + t).unsqueeze(1)
        mask = torch.arange(keys.shape[0]).unsqueeze(0) <= q_pos
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


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
