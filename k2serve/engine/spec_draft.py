"""Speculative decoding's draft model: a small model of the same vocabulary proposes the
next tokens, one batched forward pass per proposed token over every speculating sequence.

The draft keeps its own KV per sequence (contiguous, ``SequenceKVCache``): the tokens it has
computed are remembered, and each call first catches up from the longest prefix of them the
sequence still has (its prompt the first time; then the proposals the target kept and the
token it added), so refused proposals are simply overwritten. Proposals are drawn from the
draft's distribution under the request's own sampling settings (greedy: its argmax);
``seq.spec_probs`` holds those distributions for rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from k2serve.engine.sampler import SamplingRow, probabilities
from k2serve.engine.sequence import Sequence
from k2serve.models.layers.attention import (
    ContiguousAttention,
    Segment,
    SequenceKVCache,
)


@dataclass
class _DraftState:
    cache: SequenceKVCache
    computed: list[int] = field(default_factory=list)  # tokens whose draft KV is in cache


class DraftModelProposer:
    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = model.kv_cache_spec()
        self._states: dict[str, _DraftState] = {}

    def _state(self, seq: Sequence) -> _DraftState:
        state = self._states.get(seq.request_id)
        if state is None:
            s = self.spec
            cache = SequenceKVCache(s.num_layers, s.num_kv_heads, s.key_dim,
                                    value_dim=0 if s.values_in_keys else s.value_dim)
            state = self._states[seq.request_id] = _DraftState(cache)
        return state

    @torch.inference_mode()
    def propose(self, requests: list[tuple[Sequence, int]], live: set[str]) -> None:
        for request_id in [r for r in self._states if r not in live]:
            del self._states[request_id]
        active = [(seq, limit) for seq, limit in requests if limit > 0]
        for seq, _ in requests:
            seq.spec_ids, seq.spec_probs = [], None
        if not active:
            return
        # First pass: each sequence's tokens the draft has not computed yet.
        feeds: list[list[int]] = []
        for seq, _ in active:
            state = self._state(seq)
            tokens = seq.all_ids
            valid = _common_prefix(state.computed, tokens, len(tokens) - 1)
            state.computed = tokens
            state.cache.truncate(valid)
            feeds.append(tokens[valid:])
        probs: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq, _ in active}
        while active:
            next_tokens = self._forward(active, feeds)
            still, still_feeds = [], []
            for (seq, limit), (token, dist) in zip(active, next_tokens):
                seq.spec_ids.append(token)
                probs[seq.request_id].append(dist)
                if len(seq.spec_ids) < limit:
                    self._states[seq.request_id].computed.append(token)
                    still.append((seq, limit))
                    still_feeds.append([token])
            active, feeds = still, still_feeds
        for seq, _ in requests:
            if seq.spec_ids and not seq.params.greedy:
                seq.spec_probs = torch.stack(probs[seq.request_id])

    def _forward(self, active: list[tuple[Sequence, int]], feeds: list[list[int]]
                 ) -> list[tuple[int, torch.Tensor]]:
        """One batched draft step: feed each sequence its tokens, draw one more for each."""
        segments, ids, positions, last_rows = [], [], [], []
        for (seq, _), feed in zip(active, feeds):
            cache = self._states[seq.request_id].cache
            start = cache.length
            segments.append(Segment(cache, start, len(feed)))
            ids.extend(feed)
            positions.extend(range(start, start + len(feed)))
            last_rows.append(len(ids) - 1)
        ctx = ContiguousAttention(segments)
        hidden = self.model(torch.tensor(ids, dtype=torch.long),
                            torch.tensor(positions, dtype=torch.long), ctx)
        ctx.commit()
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows)])
        rows = [SamplingRow(seq.params, seq.prompt_ids, seq.output_ids + seq.spec_ids,
                            seq.generator) for seq, _ in active]
        dists = probabilities(logits, rows)
        out = []
        for (seq, _), dist in zip(active, dists):
            if seq.params.greedy:
                token = int(dist.argmax())
            else:
                token = int(torch.multinomial(dist, 1, generator=seq.generator))
            out.append((token, dist))
        return out


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    """Length of the longest common prefix of a and b, at most cap."""
    n = min(len(a), len(b), cap)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
