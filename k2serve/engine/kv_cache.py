"""The KV pool tensors, and the per-step attention context that addresses them."""

from __future__ import annotations

import os

import torch

from k2serve import native
from k2serve.engine.config import DEFAULT_KV_FRACTION, DEFAULT_KV_MAX_BYTES
from k2serve.engine.paged_attention import PagedAttention, PrefillRun
from k2serve.engine.sequence import Sequence
from k2serve.models.layers.attention import KVCacheSpec


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_bytes() -> int:
    return min(int(available_memory_bytes() * DEFAULT_KV_FRACTION), DEFAULT_KV_MAX_BYTES)


class KVPool:
    """Per layer a K tensor [slots, kv_heads, key_dim] and, unless the values live inside the
    keys (MLA), a V tensor [slots, kv_heads, value_dim].

    Block 0 is a null block, never handed out and always zero: padded decode slots point at
    it, so the rest of the pool can stay uninitialised (memory is committed only as it is
    used) without garbage reaching attention through a masked slot (0 * NaN is NaN).
    """

    NULL_BLOCK = 0

    def __init__(self, spec: KVCacheSpec, block_size: int, *, num_blocks: int | None = None,
                 max_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                 use_native: bool = True):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the KV cache is float32 or bfloat16, not {dtype}")
        self.dtype = dtype
        per_token = spec.num_kv_heads * (spec.key_dim + (0 if spec.values_in_keys else spec.value_dim))
        bytes_per_block = spec.num_layers * block_size * per_token * dtype.itemsize
        if num_blocks is None:
            num_blocks = (max_bytes or default_kv_bytes()) // bytes_per_block - 1
        if num_blocks < 1:
            raise ValueError("the KV cache is too small for a single block")
        self.block_size = block_size
        self.num_blocks = num_blocks  # usable blocks, ids 1..num_blocks
        self.bytes = (num_blocks + 1) * bytes_per_block
        slots = (num_blocks + 1) * block_size

        def pool(dim: int) -> list[torch.Tensor]:
            tensors = [torch.empty(slots, spec.num_kv_heads, dim, dtype=dtype)
                       for _ in range(spec.num_layers)]
            for t in tensors:
                t[:block_size].zero_()
            return tensors

        self.k = pool(spec.key_dim)
        self.v = None if spec.values_in_keys else pool(spec.value_dim)
        # the native decode-attention kernel, or None: gather + SDPA
        self.native = native.kernels() if use_native else None

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions start..end-1 of a sequence."""
        table = torch.tensor(seq.block_table, dtype=torch.long)
        positions = torch.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def attention_context(self, batch: list[tuple[Sequence, int]]) -> PagedAttention:
        """The step's context: decode rows (listed first) batched, prefill chunks apart.

        A decoding sequence that speculates computes its last token and the proposed ones
        after it: each is a decode row of its own (the same block table, one more token
        attended per row), so its logits are a plain decode's, whatever was proposed.

        With the native kernel every row is a decode row, prompt rows included: a token's
        attention is then one arithmetic whether its prompt ran in one chunk, in several, or
        after a prefix-cache hit (torch's prefill attention rounds a row differently with the
        chunk's length, and bfloat16 activations turn that into other greedy tokens)."""
        slot_parts, prefills = [], []
        decodes: list[tuple[Sequence, int]] = []  # (sequence, its rows), in row order
        lengths: list[int] = []  # tokens each decode row attends to, its own included
        decode_slots: list[int] = []  # slots of a run of decodes, computed without tensor ops
        row_wise = self.native is not None
        row = 0
        for seq, count in batch:
            start = seq.num_computed
            if seq.is_decoding or row_wise:
                if count > 1:  # speculative rows, or a prompt chunk as decode rows
                    if decode_slots:
                        slot_parts.append(torch.tensor(decode_slots, dtype=torch.long))
                        decode_slots = []
                    slot_parts.append(self.slots(seq, start, start + count))
                else:
                    block, offset = divmod(start, self.block_size)
                    decode_slots.append(seq.block_table[block] * self.block_size + offset)
                decodes.append((seq, count))
                lengths.extend(range(start + 1, start + count + 1))
            else:
                if decode_slots:
                    slot_parts.append(torch.tensor(decode_slots, dtype=torch.long))
                    decode_slots = []
                seen = self.slots(seq, 0, start + count)  # every position this chunk attends to
                slot_parts.append(seen[start:])
                prefills.append(PrefillRun(row, count, start, seen))
            row += count
        if decode_slots:
            slot_parts.append(torch.tensor(decode_slots, dtype=torch.long))
        slot_mapping = slot_parts[0] if len(slot_parts) == 1 else torch.cat(slot_parts)
        ctx = PagedAttention(self.k, self.v, slot_mapping, prefills=prefills)
        if decodes:
            ctx.num_decode = len(lengths)
            if self.native is not None:
                widest = max(len(seq.block_table) for seq, _ in decodes)
                tables = torch.tensor(
                    [seq.block_table + [self.NULL_BLOCK] * (widest - len(seq.block_table))
                     for seq, _ in decodes], dtype=torch.long)
                counts = [count for _, count in decodes]
                if max(counts) > 1:
                    tables = tables.repeat_interleave(torch.tensor(counts), dim=0)
                ctx.decode_block_tables = tables
                ctx.decode_lens = torch.tensor(lengths, dtype=torch.long)
                ctx.decode_kernel = self.native.paged_decode_attention
                if self.v is not None:  # K and V apart (not MLA's latent cache)
                    ctx.decode_rotary_kernel = self.native.decode_rotary_attention
                ctx.block_size = self.block_size
            else:
                longest = max(lengths)
                padded = torch.zeros(len(lengths), longest, dtype=torch.long)
                mask = torch.zeros(len(lengths), 1, 1, longest, dtype=torch.bool)
                rows = [seq for seq, count in decodes for _ in range(count)]
                for i, (seq, length) in enumerate(zip(rows, lengths)):
                    padded[i, :length] = self.slots(seq, 0, length)
                    mask[i, ..., :length] = True
                ctx.decode_slots, ctx.decode_mask = padded, mask
        return ctx
