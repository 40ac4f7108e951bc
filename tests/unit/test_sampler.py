"""The sampler: each row of a batch obeys its own parameters."""

from __future__ import annotations

import math

import torch

from k2serve.engine.sampler import SamplingRow, inverse_cdf, make_generator, sample
from k2serve.engine.sampling_params import SamplingParams


def row(prompt=(), output=(), seed=None, **params):
    p = SamplingParams(seed=seed, **params)
    return SamplingRow(p, list(prompt), list(output), make_generator(seed) if seed is not None else None)


def draws(logits, r, times=400):
    return [sample(logits.clone().unsqueeze(0), [r]).token_ids[0] for _ in range(times)]


LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_greedy_picks_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sample(logits, [row(temperature=0), row(temperature=0)]).token_ids == [1, 0]


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(draws(LOGITS, row(top_k=2))) <= {0, 1}
    # top_p=0.7: tokens 0 (0.5) and 1 (0.25) reach the mass; 2.. never drawn.
    assert set(draws(LOGITS, row(top_p=0.7))) <= {0, 1}
    # min_p=0.4: keep p >= 0.2 -> tokens 0 and 1.
    assert set(draws(LOGITS, row(min_p=0.4))) <= {0, 1}
    assert len(set(draws(LOGITS, row()))) >= 4  # unrestricted: the tail shows up


def test_rows_keep_their_own_parameters_in_one_batch():
    logits = LOGITS.repeat(3, 1)
    rows = [row(temperature=0), row(top_k=1, temperature=1.0), row(top_p=0.9)]
    for _ in range(50):
        ids = sample(logits.clone(), rows).token_ids
        assert ids[0] == 0 and ids[1] == 0 and ids[2] in (0, 1, 2)


def test_seeded_rows_are_reproducible_whatever_the_batch():
    def run(batch_extra):
        r = row(seed=42)
        logits = torch.cat([LOGITS.unsqueeze(0)] + [LOGITS.unsqueeze(0)] * batch_extra)
        rows = [r] + [row() for _ in range(batch_extra)]
        return [sample(logits.clone(), rows).token_ids[0] for _ in range(30)]
    assert run(0) == run(3)
    assert len(set(run(0))) > 1


def test_temperature_sharpens_distribution():
    cold = draws(LOGITS, row(temperature=0.1), times=300)
    assert cold.count(0) > 290


def test_logit_bias_and_penalties():
    logits = torch.zeros(1, 5)
    assert sample(logits.clone(), [row(temperature=0, logit_bias={3: 5.0})]).token_ids == [3]
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0, 0.0]])
    # Token 0 already generated: repetition penalty 2 halves its logit (2.0 -> 1.0).
    assert sample(logits.clone(), [row(temperature=0, output=[0], repetition_penalty=2.0)]).token_ids == [1]
    # Repetition penalty also counts the prompt.
    assert sample(logits.clone(), [row(temperature=0, prompt=[0], repetition_penalty=2.0)]).token_ids == [1]
    # Frequency penalty grows with the count; presence penalty is flat.
    assert sample(logits.clone(), [row(temperature=0, output=[0, 0], frequency_penalty=0.1)]).token_ids == [1]
    assert sample(logits.clone(), [row(temperature=0, output=[0, 0, 0], presence_penalty=0.05)]).token_ids == [0]


def test_logprobs_are_of_the_raw_distribution():
    result = sample(LOGITS.clone().unsqueeze(0), [row(temperature=0, logprobs=2)])
    chosen, top = result.logprobs[0]
    assert math.isclose(chosen, math.log(0.5), rel_tol=1e-5)
    assert [t for t, _ in top] == [0, 1]
    assert math.isclose(top[1][1], math.log(0.25), rel_tol=1e-5)
    assert sample(LOGITS.clone().unsqueeze(0), [row()]).logprobs == [None]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    """Chi-square of drawn counts against probs; the cells expecting fewer than 5 draws are
    pooled into one (the test's approximation needs ~5 a cell)."""
    support = probs > 0
    expected = probs[support].double() / probs[support].double().sum() * counts.sum()
    observed = counts[support].double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def test_inverse_cdf_draws_the_distribution_and_never_a_zero_token():
    """One uniform a row, two levels (blocks of 128, then tokens): the drawn frequencies fit
    the row's probabilities (chi-square), tokens of zero probability never come, whether
    they sit inside a block, fill whole blocks or pad the last one (300 = 2 x 128 + 44)."""
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(300, generator=generator) ** 4  # rare tokens too
    probs[[0, 5, 127, 128, 299]] = 0
    probs[130:256] = 0  # an empty block, nearly
    probs /= probs.sum()
    n = 200_000
    uniform = torch.rand(n, dtype=torch.float64, generator=generator)
    drawn = inverse_cdf(probs.expand(n, -1), uniform)
    counts = torch.bincount(drawn, minlength=300)
    assert counts.shape[0] == 300 and int(counts[probs == 0].sum()) == 0
    assert _chi_square_p_value(counts, probs) > 1e-3


def test_inverse_cdf_edges_of_the_uniform():
    """u = 0 draws the first token with mass; u just under 1 the last one with mass, never
    the zero tokens after it (float rounding of u * F(V) up to F(V) is clamped)."""
    probs = torch.zeros(2, 1000)
    probs[:, [3, 700, 901]] = torch.tensor([0.2, 0.5, 0.3])
    uniform = torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64)
    assert inverse_cdf(probs, uniform).tolist() == [3, 901]


def test_sampled_rows_fit_their_softmax_in_a_batch():
    """Through `sample`: rows of one batch with other temperatures, a large vocabulary."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 1000, generator=generator) * 2
    rows = [row(temperature=0.7), row(temperature=1.3)]
    counts = torch.zeros(2, 1000, dtype=torch.long)
    for _ in range(3000):
        for i, token in enumerate(sample(logits.clone(), rows).token_ids):
            counts[i, token] += 1
    for i, temperature in enumerate((0.7, 1.3)):
        probs = torch.softmax(logits[i] / temperature, -1)
        top = probs.argsort(descending=True)[:40]  # enough expected counts per cell
        pooled = torch.cat([counts[i, top], counts[i].sum().view(1) - counts[i, top].sum()])
        expected = torch.cat([probs[top], (1 - probs[top].sum()).view(1)])
        assert _chi_square_p_value(pooled, expected) > 1e-3
