"""Stop strings over streamed text.

A stop string can arrive split over several deltas, and must never reach the client. So the
matcher holds back the longest tail of the unsent text that could still grow into a stop string,
and on a match sends only the text before it.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """`feed(delta)` -> (text safe to send, stopped); `flush()` -> held-back text at the end."""

    def __init__(self, stops: Iterable[str] | None):
        self.stops = tuple(dict.fromkeys(s for s in (stops or ()) if s))  # "" would match everywhere
        # Every proper prefix of every stop: a pending tail in this set may still become a stop.
        self._prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._pending + delta
        # Stop at the match that completes first (earliest end; on a tie, the longer one): that is
        # where generation would have stopped, whichever way the text was split into deltas. No
        # match can start before `pending`, since a started one would have been held back.
        best = None
        for s in self.stops:
            i = text.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            _, start, stop = best
            self.stopped, self.matched, self._pending = True, stop, ""
            return text[:start], True
        hold = self._hold_length(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, once no more deltas will come (it did not become a stop string)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _hold_length(self, text: str) -> int:
        for k in range(min(len(text), self._max_hold), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
