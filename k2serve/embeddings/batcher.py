"""Concurrent embedding requests share forward passes on one worker thread.

A request submits its token-id sequences and awaits a future; the worker takes every job
waiting at that moment, sorts their sequences by length (less padding), and runs them in
forward passes of at most `max_batch_tokens` padded tokens. The event loop never runs model
code, and a burst of small requests costs one forward pass instead of one each.
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
        self.stats = BatchStats()

    def submit(self, sequences: list[list[int]]) -> concurrent.futures.Future:
        """Future of a (len(sequences), dim) float32 array. 503 when the queue is full."""
        with self._lock:
            if self._pending and self._pending + len(sequences) > self.max_pending_sequences:
                raise overloaded(f"{self._pending} inputs are waiting for {self.name}")
            self._pending += len(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"embed-{self.name}",
                                                daemon=True)
                self._thread.start()
        job = _Job(sequences)
        self._queue.put(job)
        return job.future

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        # Cancelling the awaiting task cancels the job (skipped if not started yet).
        return await asyncio.wrap_future(self.submit(sequences))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this round
                    break
                jobs.append(job)
            with self._lock:
                self._pending -= sum(len(j.sequences) for j in jobs)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if live:
                self._process(live)

    def _process(self, jobs: list[_Job]) -> None:
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
