"""How many tokens each sequence proposes (``spec_policy``): as many as pay for themselves,
none for a while where proposals seldom hold, and a probe after each wait."""

from __future__ import annotations

import pytest

from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest, Sequence
from k2serve.engine.spec_policy import WAIT_FIRST, WAIT_MAX, SpecPolicy, best_length


def sequence() -> Sequence:
    return Sequence(GenerationRequest("r", [1, 2, 3], SamplingParams(max_tokens=500)))


@pytest.mark.parametrize("a, cost, expected", [
    (0.9, 0.0, 4),   # free proposals that hold: the most
    (0.1, 0.0, 1),   # free but seldom right: one (its row in the step costs a little)
    (0.0, 0.0, 0),   # never right: none
    (0.9, 0.1, 4),
    (0.4, 0.5, 0),   # 1 + 0.4 tokens for 1.52 steps' time: a loss
    (0.6, 0.5, 1),   # 1.6 tokens for 1.52 steps: a small gain
    (0.8, 0.5, 2),   # 2.44 tokens for 2.04 steps beats 1.8 for 1.52 and 2.95 for 2.56
    (0.99, 0.25, 4),
    (1.0, 1.0, 0),   # the target as its own draft: k + 1 tokens in k + 1 steps' time
])
def test_the_length_that_yields_most_tokens_per_time(a, cost, expected):
    assert best_length(a, cost, 4) == expected


def test_a_sequence_whose_proposals_fail_waits_longer_each_time_then_recovers():
    policy, seq = SpecPolicy(), sequence()
    policy.timed(propose_s=0.05, rounds=1, step_s=0.1)  # a round costs half a step
    assert policy.cost == pytest.approx(0.5)
    steps_between_proposals = []
    since = 0
    for _ in range(200):
        k = policy.limit(seq, 4)
        since += 1
        if k:
            steps_between_proposals.append(since)
            since = 0
            policy.verified(seq, k, 0)  # all refused
    waits = [gap - 1 for gap in steps_between_proposals[1:]]  # plain steps between
    assert waits[:4] == [WAIT_FIRST, 2 * WAIT_FIRST, 4 * WAIT_FIRST, WAIT_MAX]
    assert set(waits[4:]) == {WAIT_MAX}
    # The text changes: from now on every proposed token is kept. After the wait under way,
    # a probe or two tell, and proposals grow to the most again.
    lengths = []
    for _ in range(120):
        k = policy.limit(seq, 4)
        lengths.append(k)
        policy.verified(seq, k, k)
    assert lengths[-5:] == [4] * 5 and seq.spec_backoff == 0
    assert lengths.index(4) <= WAIT_MAX + 3 * WAIT_FIRST


def test_off_it_proposes_the_most_always():
    policy, seq = SpecPolicy(adaptive=False), sequence()
    policy.timed(propose_s=1.0, rounds=1, step_s=0.1)
    for _ in range(20):
        assert policy.limit(seq, 3) == 3
        policy.verified(seq, 3, 0)
