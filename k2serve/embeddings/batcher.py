"""Concurrent embedding requests share forward passes on one worker thread.

A request submits its token-id sequences and awaits a future; the worker takes every job
waiting at that moment, sorts their sequences by length (less padding), and runs them in
forward passes of at most `max_batch_tokens` padded tokens. The event loop never runs model
code, and a burst of small requests costs one forward pass instead of one each.

Jobs of a batch (priority 1) wait while interactive jobs (priority 0) are queued, and run
one forward pass at a time, so an interactive request that arrives meanwhile waits for at
most one pass of batch work, not for the whole batch line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from k2serve.errors import overloaded

log = logging.getLogger("k2serve.embeddings")

Forward = Callable[[list[list[int]]], np.ndarray]


@dataclass
class _Job:
    sequences: list[list[int]]
    priority: int = 0  # 0 interactive, 1 a batch line
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatchStats:
    requests: int = 0
    sequences: int = 0
    forward_passes: int = 0


class EmbeddingBatcher:
    def __init__(self, name: str, forward: Forward, *, max_batch_tokens: int = 16384,
                 max_pending_sequences: int = 16384):
        self.name = name
        self._forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_pending_sequences = max_pending_sequences
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0  # sequences queued, not yet taken by the worker
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False  # close() was called: the worker ends after this round
        self.stats = BatchStats()

    def submit(self, sequences: list[list[int]], priority: int = 0
               ) -> concurrent.futures.Future:
        """Future of a (len(sequences), dim) float32 array. 503 when the queue is full."""
        with self._lock:
            if self._pending and self._pending + len(sequences) > self.max_pending_sequences:
                raise overloaded(f"{self._pending} inputs are waiting for {self.name}")
            self._pending += len(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"embed-{self.name}",
                                                daemon=True)
                self._thread.start()
        job = _Job(sequences, priority)
        self._queue.put(job)
        return job.future

    async def embed(self, sequences: list[list[int]], priority: int = 0) -> np.ndarray:
        # Cancelling the awaiting task cancels the job (skipped if not started yet).
        return await asyncio.wrap_future(self.submit(sequences, priority))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _run(self) -> None:
        background: list[_Job] = []  # batch jobs taken, not yet run
        while not self._stopping:
            self._admit(background, block=not background)
            if background and not self._stopping:
                jobs, background = background, []
                # Between two passes of batch work, interactive jobs that came meanwhile run.
                self._process(jobs, between=lambda: self._admit(background, block=False))
        for job in background:  # started (running) futures cannot be cancelled
            job.future.set_exception(RuntimeError(f"{self.name} was closed"))

    def _admit(self, background: list[_Job], block: bool) -> None:
        """Take the queued jobs (waiting for one if `block`): run the interactive ones now,
        add the batch ones to `background`."""
        jobs: list[_Job] = []
        while not self._stopping:
            try:
                job = self._queue.get() if block and not jobs else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
            else:
                jobs.append(job)
        with self._lock:
            self._pending -= sum(len(j.sequences) for j in jobs)
        started = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        interactive = [j for j in started if j.priority == 0]
        background += [j for j in started if j.priority != 0]
        if interactive:
            self._process(interactive)

    def _process(self, jobs: list[_Job], between: Callable[[], None] | None = None) -> None:
        items = [(j, i, seq) for j, job in enumerate(jobs) for i, seq in enumerate(job.sequences)]
        items.sort(key=lambda item: len(item[2]))
        outputs: list[np.ndarray | None] = [None] * len(jobs)
        try:
            start = 0
            while start < len(items):
                # Sorted ascending, so the last item of a chunk sets its padded width.
                end = start + 1
                while end < len(items) and (end + 1 - start) * len(items[end][2]) <= self.max_batch_tokens:
                    end += 1
                chunk = items[start:end]
                if between is not None and start:
                    between()
                vectors = self._forward([seq for _, _, seq in chunk])
                self.stats.forward_passes += 1
                for (j, i, _), vector in zip(chunk, vectors):
                    if outputs[j] is None:
                        outputs[j] = np.empty((len(jobs[j].sequences), vectors.shape[1]),
                                              dtype=np.float32)
                    outputs[j][i] = vector
                start = end
        except Exception as exc:  # every job of this round gets the error
            log.exception("embedding forward pass failed (%s)", self.name)
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats.requests += len(jobs)
        self.stats.sequences += len(items)
        for job, out in zip(jobs, outputs):
            job.future.set_result(out if out is not None else np.empty((0, 0), np.float32))
