"""One worker thread per pipeline, a bounded queue in front of it, and a progress log.

A pipeline call already uses every core it is given, so calls run one at a time; up to
`max_waiting` more wait, and past that a request is refused at once (`Busy`: the API
answers 503 with retry-after). Each call logs its steps (`k2serve.diffusion` logger) and
can be stopped between two steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from k2serve.diffusion.pipelines import Stopped

log = logging.getLogger("k2serve.diffusion")


class Busy(Exception):
    """More calls are waiting for the pipeline than its queue holds."""


class StepLog:
    """A call's step callback: logs its progress (at most once a second, and the last
    step), remembers it for status reads, and stops the call once `stop` is set."""

    def __init__(self, label: str):
        self.label = label
        self.stop = threading.Event()
        self.done = 0
        self.total = 0
        self._logged_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        if done == total or now - self._logged_at >= 1.0:
            self._logged_at = now
            log.info("%s: step %d/%d", self.label, done, total)
        if self.stop.is_set():
            raise Stopped(self.label)


class PipelineWorker:
    def __init__(self, name: str, max_waiting: int):
        self.name = name
        self.max_waiting = max_waiting
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._admitted = 0
        self._lock = threading.Lock()

    @property
    def admitted(self) -> int:
        return self._admitted

    def admit(self, force: bool = False) -> None:
        """Take a place (running or waiting), or raise Busy (`force`: a job accepted before,
        resumed after a restart, takes one whatever the queue holds)."""
        with self._lock:
            if not force and self._admitted >= 1 + self.max_waiting:
                raise Busy(f"{self._admitted} {self.name} requests are running or queued "
                           f"(at most {1 + self.max_waiting})")
            self._admitted += 1

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def run(self, fn: Callable[..., Any], *args, steps: StepLog | None = None) -> Any:
        """Run `fn(*args)` on the worker thread, holding an admitted place (see `admit`).
        A caller cancelled while it runs stops it at its next step."""
        future = self._executor.submit(fn, *args)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if steps is not None:
                steps.stop.set()
            future.cancel()  # not started yet: it never runs
            raise

    def stats(self) -> dict:
        return {"running": min(self._admitted, 1), "waiting": max(0, self._admitted - 1)}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
