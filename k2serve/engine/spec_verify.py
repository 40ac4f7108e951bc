"""Speculative decoding's verification: which proposed tokens a sequence keeps.

The target model scored the sequence's last token and its k proposed tokens in one step,
giving k + 1 rows of logits; row j is the distribution of the token after proposal j - 1.
Greedy rows keep proposals while they equal the row's own pick (``sample`` itself picks, so
the tokens are those of plain decoding), then add the pick of the first row that differs
(or of row k). Sampled rows use speculative rejection sampling (Leviathan et al. 2023):
proposal x, drawn from q, is kept with probability min(1, p(x) / q(x)); the first one
refused is replaced by a draw from norm(max(0, p - q)); when all are kept a last token is
drawn from row k. Each emitted token is then distributed exactly as under ``sample``.
An n-gram proposal is deterministic: q is one-hot at x, so x is kept with probability p(x)
and replaced by a draw from p without x.
"""

from __future__ import annotations

import torch

from k2serve.engine.sampler import SamplingRow, probabilities, sample
from k2serve.engine.sequence import Sequence, TokenLogprob


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, proposed: int) -> torch.Tensor:
    """What a refused proposal is replaced by: norm(max(0, p - q)) (q None: one-hot)."""
    if q is None:
        residual = p.clone()
        residual[proposed] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if not total > 0:  # p <= q everywhere: p == q up to rounding, a refusal had no chance
        return p
    return residual / total


def verify(seq: Sequence, logits: torch.Tensor, proposed: list[int],
           proposal_probs: torch.Tensor | None
           ) -> tuple[list[int], list[TokenLogprob] | None, int]:
    """logits: [k + 1, V], row j after the sequence's tokens and proposed[:j].
    -> (tokens to append: the kept proposals and one more, their logprobs when the request
    asks for them, how many proposals were kept)."""
    k = len(proposed)
    rows = [SamplingRow(seq.params, seq.prompt_ids, seq.output_ids + proposed[:j], seq.generator)
            for j in range(k + 1)]
    if seq.params.greedy:
        result = sample(logits, rows)
        picks = result.token_ids
        kept = 0
        while kept < k and picks[kept] == proposed[kept]:
            kept += 1
        tokens = proposed[:kept] + [picks[kept]]
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [TokenLogprob(t, lp[0], lp[1])
                        for t, lp in zip(tokens, result.logprobs[:kept + 1])]
        return tokens, logprobs, kept

    probs = probabilities(logits, rows)
    generator = seq.generator
    tokens: list[int] = []
    for j, x in enumerate(proposed):
        p = probs[j]
        q = proposal_probs[j] if proposal_probs is not None else None
        q_x = 1.0 if q is None else float(q[x])
        u = float(torch.rand((), generator=generator))
        if u * q_x < float(p[x]):  # u < p(x) / q(x)
            tokens.append(x)
            continue
        tokens.append(_draw(residual_distribution(p, q, x), generator))
        break
    else:
        tokens.append(_draw(probs[k], generator))
    kept = len(tokens) - 1
    return tokens, _logprobs(seq, logits, tokens), kept


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprobs(seq: Sequence, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob] | None:
    """As ``sample`` reports them: the model's own distribution, before any processing."""
    top_k = seq.params.logprobs
    if top_k is None:
        return None
    logprobs = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
    out = []
    for j, token in enumerate(tokens):
        top = []
        if top_k:
            values, ids = torch.topk(logprobs[j], top_k)
            top = list(zip(ids.tolist(), values.tolist()))
        out.append(TokenLogprob(token, float(logprobs[j, token]), top))
    return out
