"""How many tokens each sequence should have proposed this step: speculation that pays.

A proposal of k tokens, each kept with probability a (the sequence's acceptance rate so far),
yields on average 1 + a + ... + a^k tokens from one target step; it costs the target step
plus k proposer rounds, each ``cost`` target steps (measured while serving: a draft model's
forward pass, a near-free n-gram lookup), plus k more rows to verify, each VERIFY_COST of
a step (a row's share of a 32-row decode step, about what it costs on a CPU). The policy
picks the k in 0..limit that yields the most tokens per unit of time. A sequence whose
proposals rarely hold (a weak draft on this text) gets k = 0: it decodes plainly for a while
(WAIT_FIRST steps, doubling up to WAIT_MAX while it stays so), then proposes one token again
to see whether the text has changed.

Which k a step uses depends only on what came before it, so greedy output and the sampled
distribution (rejection sampling) are those of plain decoding whatever the policy decides.
"""

from __future__ import annotations

from k2serve.engine.sequence import Sequence

DECAY = 0.8  # weight of the earlier verifications against the latest one
# Acceptance before any verification: 0.75 (the prior's weight: two tokens), so a new
# sequence proposes and is measured.
PRIOR_KEPT, PRIOR_WEIGHT = 1.5, 2.0
VERIFY_COST = 0.02  # one more row in the target's step, in target steps
COST_SMOOTHING = 0.2  # weight of the latest step's measured proposer cost
WAIT_FIRST, WAIT_MAX = 8, 64  # steps of plain decoding after speculation stopped paying


class SpecPolicy:
    def __init__(self, adaptive: bool = True):
        self.adaptive = adaptive
        self.cost = 0.0  # one proposer round, in target steps (EWMA; 0 until measured)

    # -- decisions --------------------------------------------------------------------
    def limit(self, seq: Sequence, cap: int) -> int:
        """Tokens to propose for seq this step, at most cap."""
        if not self.adaptive or cap <= 0:
            return cap
        if seq.spec_wait > 0:
            seq.spec_wait -= 1
            return 0
        if seq.spec_probing:  # the first step after a wait: one token tells
            return 1
        best = best_length(acceptance(seq), self.cost, cap)
        if best == 0:
            seq.spec_backoff = min(WAIT_MAX, 2 * seq.spec_backoff or WAIT_FIRST)
            seq.spec_wait = seq.spec_backoff - 1  # this step is the first of the wait
            seq.spec_probing = True
        return best

    # -- what happened ------------------------------------------------------------------
    def verified(self, seq: Sequence, proposed: int, kept: int) -> None:
        """Tokens kept of a proposal: kept in a row, then one refused (unless all were kept)."""
        if proposed == 0:
            return
        refused = 1.0 if kept < proposed else 0.0
        seq.spec_kept = DECAY * seq.spec_kept + kept
        seq.spec_refused = DECAY * seq.spec_refused + refused
        if seq.spec_probing:
            seq.spec_probing = False
            if kept:  # the text changed: speculation pays again, start waits afresh
                seq.spec_backoff = 0

    def timed(self, propose_s: float, rounds: int, step_s: float) -> None:
        """One step's measured times: the proposer's (over ``rounds`` forward rounds) and
        the target's (forward pass, verification and sampling)."""
        if rounds <= 0 or step_s <= 0:
            return
        observed = propose_s / rounds / step_s
        self.cost += COST_SMOOTHING * (observed - self.cost) if self.cost else observed


def acceptance(seq: Sequence) -> float:
    """The chance that a proposed token is kept, from this sequence's verifications."""
    return (seq.spec_kept + PRIOR_KEPT) / (seq.spec_kept + seq.spec_refused + PRIOR_WEIGHT)


def best_length(a: float, cost: float, cap: int) -> int:
    """The k in 0..cap maximizing expected tokens (1 + a + ... + a^k) per time
    (1 + k (cost + VERIFY_COST))."""
    best, best_rate = 0, 1.0
    expected, power = 1.0, 1.0
    for k in range(1, cap + 1):
        power *= a
        expected += power
        rate = expected / (1.0 + k * (cost + VERIFY_COST))
        if rate > best_rate:
            best, best_rate = k, rate
    return best
