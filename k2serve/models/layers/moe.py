"""Mixture of experts for DeepSeek-V3 / Kimi K2: noaux_tc sigmoid routing, grouped dispatch.

Routing (transformers' ``DeepseekV3TopkRouter``): scores = sigmoid(x @ gate^T) in float32;
experts are *chosen* by scores + e_score_correction_bias, limited to the `topk_group` best
groups (group score = sum of its two best biased scores); the *weights* are the unbiased
scores of the chosen experts, normalised if norm_topk_prob, times routed_scaling_factor.

Dispatch sorts the (token, expert) pairs by expert and runs each expert that was hit once
on its contiguous run of tokens, so work follows the experts actually used, never all of
them. Expert weights are stacked per layer ([E, 2I, H] gate+up, [E, H, I] down), the
layout a grouped GEMM wants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.models.layers.int4_linear import Int4Linear
from k2serve.models.layers.linear import Linear, MergedLinear


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class NoAuxTCRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        # float32 whatever the model dtype: routing decisions are sensitive (as transformers)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k])."""
        scores = F.linear(x.float(), self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class RoutedExperts(nn.Module):
    """E SwiGLU experts stacked in two tensors, run on the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                    requires_grad=False)
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                                 requires_grad=False)

    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        inter = self.intermediate_size
        if proj == "down_proj":
            self.down.data[expert].copy_(tensor)
        else:
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
            self.gate_up.data[expert, rows].copy_(tensor)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # pairs grouped by expert
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        hit = counts.nonzero().flatten()
        ends = counts.cumsum(0)[hit]
        xs = x[token]
        ys = torch.empty_like(xs)
        for e, end, n in zip(hit.tolist(), ends.tolist(), counts[hit].tolist()):
            rows = slice(end - n, end)
            gate, up = F.linear(xs[rows], self.gate_up[e]).chunk(2, dim=-1)
            ys[rows] = F.linear(F.silu(gate) * up, self.down[e])
        scaled = (ys * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, scaled)


class Int4RoutedExperts(nn.Module):
    """E SwiGLU experts kept 4-bit (``Int4Linear``: gate+up stacked, down), run on the tokens
    routed to them; an expert whose checkpoint tensors are not 4-bit runs dense.

    dense_min_rows: tokens routed to an expert from which it uses a dense float32 copy of
    its weight (None: the int4 kernel for any count, and 4-bit memory only).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dense_min_rows: int | None = None, native: bool = True):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        shards = {"gate": intermediate_size, "up": intermediate_size}
        self.gate_up = nn.ModuleList(Int4Linear(hidden_size, shards, dense_min_rows, native=native)
                                     for _ in range(num_experts))
        self.down = nn.ModuleList(Int4Linear(intermediate_size, hidden_size, dense_min_rows, native=native)
                                  for _ in range(num_experts))

    def load_expert(self, expert: int, proj: str, tensor) -> None:
        if proj == "down_proj":
            self.down[expert].load(tensor)
        else:
            self.gate_up[expert].load(tensor, proj.removesuffix("_proj"))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        hit = counts.nonzero().flatten()
        ends = counts.cumsum(0)[hit]
        xs = x[token].float()
        ys = torch.empty_like(xs)
        for e, end, n in zip(hit.tolist(), ends.tolist(), counts[hit].tolist()):
            rows = slice(end - n, end)
            gate, up = self.gate_up[e](xs[rows]).chunk(2, dim=-1)
            ys[rows] = self.down[e](F.silu(gate) * up)
        scaled = (ys * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, scaled)


class DeepseekMoE(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, n_shared_experts: int,
                 router: NoAuxTCRouter, dtype: torch.dtype, experts: nn.Module | None = None):
        """experts: the routed experts (default: dense ``RoutedExperts`` in ``dtype``)."""
        super().__init__()
        self.gate = router  # HF name: mlp.gate.{weight, e_score_correction_bias}
        self.experts = experts if experts is not None else RoutedExperts(num_experts, hidden_size, intermediate_size, dtype)
        self.shared_experts = (SwiGLUMLP(hidden_size, intermediate_size * n_shared_experts, dtype)
                               if n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
