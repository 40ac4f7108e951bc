"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

Everything that can be done for the whole batch at once is (temperature, top-k, top-p,
min-p, the draw itself); per-row work is limited to rows that ask for it (logit bias,
penalties, seeded generators).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k2serve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence of the batch."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None  # set when params.seed is given
    allowed: torch.Tensor | None = None  # bool [V]: the tokens a grammar allows next


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (logprob of the sampled token, [(token_id, logprob)] top alternatives), or None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """logits: [B, V] float32, one row per entry of ``rows``."""
    logits = logits.float()
    wants_logprobs = [r.params.logprobs is not None for r in rows]
    # Logprobs are reported from the model's own distribution (before penalties and
    # temperature), as vLLM does by default and as OpenAI documents.
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None

    logits = _apply_biases_and_penalties(logits, rows)
    # Last, so no bias or penalty can bring back a token the grammar rules out.
    for i, row in enumerate(rows):
        if row.allowed is not None:
            logits[i].masked_fill_(~row.allowed.to(logits.device), float("-inf"))
    token_ids = _draw(logits, rows)

    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, row in enumerate(rows):
        if not wants_logprobs[i]:
            logprobs.append(None)
            continue
        row_lp = raw_logprobs[i]
        chosen = float(row_lp[token_ids[i]])
        top: list[tuple[int, float]] = []
        if row.params.logprobs:
            values, ids = torch.topk(row_lp, row.params.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        logprobs.append((chosen, top))
    return SampleResult(token_ids=token_ids, logprobs=logprobs)


def probabilities(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution ``sample`` draws each row from, [B, V] float32: after biases,
    penalties, the grammar mask, temperature and top-k / top-p / min-p; a greedy row is
    one-hot at its argmax. (Speculative decoding accepts and resamples against it.)"""
    logits = _apply_biases_and_penalties(logits.float().clone(), rows)
    for i, row in enumerate(rows):
        if row.allowed is not None:
            logits[i].masked_fill_(~row.allowed.to(logits.device), float("-inf"))
    probs = torch.zeros_like(logits)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        index = torch.tensor(greedy, dtype=torch.long)
        probs[index, logits[index].argmax(dim=-1)] = 1.0
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        index = torch.tensor(sampled, dtype=torch.long)
        temperature = torch.tensor([rows[i].params.temperature for i in sampled]).unsqueeze(1)
        sub = _filter_top_k_top_p_min_p(logits[index] / temperature,
                                        [rows[i].params for i in sampled])
        probs[index] = torch.softmax(sub, dim=-1)
    return probs


def _apply_biases_and_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
            bias = torch.tensor([p.logit_bias[t] for t in p.logit_bias if 0 <= t < vocab])
            logits[i].index_add_(0, ids, bias)
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
            if len(seen):
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                              values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            counts = torch.bincount(torch.tensor(row.output_ids), minlength=vocab)[:vocab].float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled_rows:
        return logits.argmax(dim=-1).tolist()

    # (each pass over a [32, 49k] float32 batch costs ~0.5-1 ms: no copy or argmax of rows
    # that do not need one)
    everyone = len(sampled_rows) == len(rows)
    index = torch.tensor(sampled_rows, dtype=torch.long)
    sub = logits if everyone else logits[index]
    temperature = torch.tensor([rows[i].params.temperature for i in sampled_rows]).unsqueeze(1)
    sub = sub / temperature
    sub = _filter_top_k_top_p_min_p(sub, [rows[i].params for i in sampled_rows])
    probs = torch.softmax(sub, dim=-1)

    # One uniform number a row: a batched draw for unseeded rows; seeded rows draw theirs
    # from their own generator, so a seed gives the same tokens whatever else is in the batch.
    uniform = torch.empty(len(sampled_rows), dtype=torch.float64)
    unseeded = [j for j, i in enumerate(sampled_rows) if rows[i].generator is None]
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for j, i in enumerate(sampled_rows):
        generator = rows[i].generator
        if generator is not None:
            uniform[j] = torch.rand((), dtype=torch.float64, generator=generator)
    chosen = inverse_cdf(probs, uniform)
    if everyone:
        return chosen.tolist()
    result = logits.argmax(dim=-1)
    result[index] = chosen
    return result.tolist()


INVERSE_CDF_BLOCK = 128


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each row's token i with F(i-1) <= u * F(V) < F(i), F the row's cumulative sum: a draw
    from ``probs`` [S, V] (float32, rows summing to ~1) given u [S] uniform in [0, 1).

    In two levels: a block of 128 tokens by the blocks' masses (float32 sums, accumulated
    in float64), then a token of that block by its float64 cumulative sum, the block's share
    of u rescaled onto it. A float32 cumulative sum over 49k tokens would round away the
    mass of rare tokens, and a float64 one over the whole row costs several times the
    softmax. A token of zero probability is never drawn (ties of F cannot be strictly
    crossed; the rounding edge u * F(V) ~ F(V) is clamped to the last block and token with
    mass). (The exponential race this replaces drew V exponentials a row: 1 ms a row of a
    49k vocabulary, more than the rest of a decode step per row.)"""
    s, v = probs.shape
    pad = -v % INVERSE_CDF_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(s, -1, INVERSE_CDF_BLOCK)
    mass = blocks.sum(-1).double()  # [S, nb]
    block_cdf = mass.cumsum(-1)
    target = (uniform * block_cdf[:, -1]).unsqueeze(1)
    last_block = (block_cdf < block_cdf[:, -1:]).sum(-1, keepdim=True)  # the last block with mass
    block = torch.minimum(torch.searchsorted(block_cdf, target, right=True), last_block)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    within = blocks[torch.arange(s), block.squeeze(1)].double().cumsum(-1)  # [S, B]
    share = (target - before) / mass.gather(1, block) * within[:, -1:]
    last_token = (within < within[:, -1:]).sum(-1, keepdim=True)
    token = torch.minimum(torch.searchsorted(within, share, right=True), last_token)
    return (block * INVERSE_CDF_BLOCK + token).squeeze(1)


def _filter_top_k_top_p_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])
    if bool((top_k >= vocab).all()) and bool((top_p >= 1.0).all()) and bool((min_p <= 0).all()):
        return logits

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab).unsqueeze(0)
    remove = positions >= top_k.unsqueeze(1)

    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove |= mass_before >= top_p.unsqueeze(1)
    # min_p: drop tokens below min_p x the top token's probability.
    remove |= sorted_probs < (min_p.unsqueeze(1) * sorted_probs[:, :1])
    remove[:, 0] = False

    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
