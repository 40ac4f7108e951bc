"""Interactive requests being prepared (parsed, rendered, tokenized) before they reach an
engine: while one is, engines run no step of background (batch) work only.

On a machine with few cores a batch step competes with the request's own preparation for
the CPU (and for the interpreter lock); pausing background steps then keeps a batch from
adding to an interactive request's time to first token. A hold pauses them for at most
MAX_HOLD_S from its start, so a slow preparation never stops a batch for long.

The gate also counts interactive requests in flight (from arrival to the reply's end): the
batch runner starts no new line while there are any, so a line's own preparation (parsing,
rendering, tokenizing, its ledger row) stays off the CPU that interactive requests need.
"""

from __future__ import annotations

import threading
import time

MAX_HOLD_S = 2.0


class ForegroundGate:
    def __init__(self):
        self._lock = threading.Lock()
        self._holds = 0
        self._last_start = 0.0
        self._active = 0  # interactive requests in flight

    def hold(self) -> None:
        """An interactive request began; `release()` once it is in an engine (or ended)."""
        with self._lock:
            self._holds += 1
            self._last_start = time.monotonic()

    def release(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)

    def enter(self) -> None:
        """An interactive request arrived; `leave()` when its reply has ended."""
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)

    @property
    def active(self) -> int:
        """Interactive requests in flight (read by the batch runner)."""
        return self._active

    def pending(self) -> bool:
        """Whether background steps should wait (read by engine threads)."""
        return self._holds > 0 and time.monotonic() - self._last_start < MAX_HOLD_S


FOREGROUND = ForegroundGate()  # one per process: the cores are shared by every engine
