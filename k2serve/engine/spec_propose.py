"""Speculative decoding's proposers: the tokens a decoding sequence might produce next.

Each proposer sets ``seq.spec_ids`` (at most the limit it is given per sequence) and
``seq.spec_probs`` (the distribution each proposal was drawn from, or None when proposals
are deterministic); the engine then verifies them (``spec_verify``).
``NgramProposer`` looks the sequence's last few tokens up earlier in its own text (prompt
lookup): free to compute, and right whenever the answer copies the prompt (edits, quotes,
code). ``DraftModelProposer`` (``spec_draft``) runs a small model with the same vocabulary.
"""

from __future__ import annotations

from array import array
from typing import Protocol

from k2serve.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, requests: list[tuple[Sequence, int]], live: set[str]) -> None:
        """Proposals for each (sequence, most tokens); ``live``: request ids still in the
        engine (a proposer may drop state of the others)."""
        ...


class NgramProposer:
    """Prompt lookup: the longest suffix of ``max_n`` down to ``min_n`` tokens that occurred
    before, most recent occurrence first; the tokens that followed it are the proposal."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, requests: list[tuple[Sequence, int]], live: set[str]) -> None:
        for seq, limit in requests:
            seq.spec_ids = self.lookup(seq.all_ids, limit)
            seq.spec_probs = None

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        if limit <= 0:
            return []
        # bytes.rfind does the scan in C; matches must start on a token boundary
        data = array("q", tokens).tobytes()
        width = 8
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            pattern = data[-n * width:]
            end = len(data) - width  # the match must end before the last token
            while True:
                at = data.rfind(pattern, 0, end)
                if at < 0:
                    break
                if at % width == 0:
                    start = at // width + n
                    return tokens[start:start + limit]
                end = at + len(pattern) - 1
        return []
