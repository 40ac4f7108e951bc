"""Grouped expert dispatch: same result as a per-token loop, and experts nobody routed to
are never touched (their weights are NaN here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2serve.models.layers.moe import RoutedExperts


def test_dispatch_runs_only_hit_experts_and_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    experts = RoutedExperts(num_experts=16, hidden_size=8, intermediate_size=4, dtype=torch.float32)
    experts.gate_up.data.normal_(generator=g)
    experts.down.data.normal_(generator=g)
    x = torch.randn(5, 8, generator=g)
    ids = torch.tensor([[3, 7], [7, 3], [12, 3], [3, 7], [0, 12]])
    weights = torch.rand(5, 2, generator=g)
    unused = [e for e in range(16) if e not in ids.unique().tolist()]
    experts.gate_up.data[unused] = float("nan")
    experts.down.data[unused] = float("nan")

    out = experts(x, weights, ids)

    expected = torch.zeros_like(x)
    for t in range(5):
        for k in range(2):
            e = ids[t, k]
            gate, up = F.linear(x[t], experts.gate_up[e]).chunk(2)
            expected[t] += weights[t, k] * F.linear(F.silu(gate) * up, experts.down[e])
    assert torch.allclose(out, expected, atol=1e-5)
