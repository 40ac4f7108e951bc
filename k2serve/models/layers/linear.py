"""Linear layers that own how checkpoint tensors are copied into them.

``MergedLinear`` stacks several checkpoint projections (q/k/v, gate/up) into one weight
so a layer does one matmul instead of several; ``load(tensor, shard)`` copies one
checkpoint tensor into its rows. Quantized variants can replace these classes and keep
the same ``load`` signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T, no bias."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def shard_shape(self, shard: str | None = None) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def load(self, tensor: torch.Tensor, shard: str | None = None) -> None:
        _check_shape(tensor, self.shard_shape(shard))
        self.weight.data.copy_(tensor)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], dtype: torch.dtype | None = None):
        super().__init__(in_features, sum(shard_sizes.values()), dtype)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets, offset = {}, 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def shard_shape(self, shard: str | None = None) -> tuple[int, int]:
        return (self.shard_sizes[shard], self.in_features)

    def load(self, tensor: torch.Tensor, shard: str | None = None) -> None:
        _check_shape(tensor, self.shard_shape(shard))
        start = self.shard_offsets[shard]
        self.weight.data[start:start + self.shard_sizes[shard]].copy_(tensor)


def _check_shape(tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(tensor.shape)}")
