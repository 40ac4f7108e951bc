"""Packed allowed-token bitmasks (llguidance's layout: bit j of int32 word i is token 32*i+j)
applied to a batch of logits."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


def allocate(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """bool [rows, width]: True where allowed; ids past the bitmask's vocabulary are not."""
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().reshape(bitmask.shape[0], -1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.zeros(bitmask.shape[0], width - bits.shape[1], dtype=torch.bool)
    return torch.cat([bits, pad], dim=1)


def allowed_tokens(matchers: list, width: int, fallbacks: list[frozenset[int]]
                   ) -> list[torch.Tensor | None]:
    """One bool [width] mask per matcher (None where there is none).

    A matcher that allows nothing (it is in an error state) gets its `fallbacks` entry (the
    sequence's stop tokens),
    so the sequence ends instead of sampling from an empty distribution.
    """
    index = [i for i, m in enumerate(matchers) if m is not None]
    out: list[torch.Tensor | None] = [None] * len(matchers)
    if not index:
        return out
    vocab = matchers[index[0]].vocab_size
    bitmask = allocate(len(index), vocab)
    for row, i in enumerate(index):
        matchers[i].fill_bitmask(bitmask, row)
    allowed = unpack(bitmask, width)
    for row, i in enumerate(index):
        mask = allowed[row]
        if not bool(mask.any()):
            mask[[t for t in fallbacks[i] if t < width]] = True
        out[i] = mask
    return out
