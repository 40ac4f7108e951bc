"""EmbeddingBatcher: jobs waiting together share forward passes, results go back to the
right request and row, the token budget splits passes, errors reach every waiting job."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from k2serve.embeddings.batcher import EmbeddingBatcher
from k2serve.errors import APIError


class GatedForward:
    """Vectors that identify their sequence: [first id, length]. The first call waits for
    `gate`, so jobs submitted meanwhile queue up behind it."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, batch):
        self.calls.append(batch)
        self.started.set()
        self.gate.wait(10)
        return np.array([[seq[0], len(seq)] for seq in batch], dtype=np.float32)


def test_waiting_jobs_share_one_forward_pass():
    forward = GatedForward()
    batcher = EmbeddingBatcher("t", forward, max_batch_tokens=10_000)
    first = batcher.submit([[1, 2, 3]])
    assert forward.started.wait(5)
    later = [batcher.submit([[10 * i + j] * (j + 1) for j in range(3)]) for i in range(1, 6)]
    forward.gate.set()
    assert first.result(5).tolist() == [[1, 3]]
    for i, fut in enumerate(later, start=1):
        assert fut.result(5).tolist() == [[10 * i + j, j + 1] for j in range(3)]
    assert len(forward.calls) == 2  # the first job, then all five later ones together
    assert len(forward.calls[1]) == 15
    # sorted by length inside the pass (less padding)
    assert [len(s) for s in forward.calls[1]] == sorted(len(s) for s in forward.calls[1])
    assert batcher.stats.forward_passes == 2 and batcher.stats.requests == 6
    batcher.close()


def test_token_budget_splits_forward_passes():
    calls = []

    def forward(batch):
        calls.append([len(s) for s in batch])
        return np.zeros((len(batch), 2), dtype=np.float32)

    batcher = EmbeddingBatcher("t", forward, max_batch_tokens=12)
    out = batcher.submit([[1] * n for n in (5, 1, 4, 2, 6, 3)]).result(5)
    assert out.shape == (6, 2)
    for lengths in calls:  # padded size of each pass within the budget
        assert len(lengths) * max(lengths) <= 12 or len(lengths) == 1
    assert sorted(n for c in calls for n in c) == [1, 2, 3, 4, 5, 6]
    batcher.close()


def test_a_failing_forward_fails_every_job_of_its_round():
    forward = GatedForward()

    def failing(batch):
        if forward.calls:
            raise RuntimeError("boom")
        return forward(batch)

    batcher = EmbeddingBatcher("t", failing)
    ok = batcher.submit([[1]])
    assert forward.started.wait(5)
    doomed = [batcher.submit([[2]]), batcher.submit([[3]])]
    forward.gate.set()
    assert ok.result(5).tolist() == [[1, 1]]
    for fut in doomed:
        with pytest.raises(RuntimeError, match="boom"):
            fut.result(5)
    batcher.close()


def test_a_full_queue_answers_503_and_cancelled_jobs_are_skipped():
    forward = GatedForward()
    batcher = EmbeddingBatcher("t", forward, max_pending_sequences=4)
    batcher.submit([[1]])
    assert forward.started.wait(5)
    cancelled = batcher.submit([[7]] * 3)
    with pytest.raises(APIError) as err:
        batcher.submit([[8]] * 2)
    assert err.value.status == 503
    assert cancelled.cancel()
    forward.gate.set()
    survivor = batcher.submit([[9]])
    assert survivor.result(5).tolist() == [[9, 1]]
    assert all(seq[0] != 7 for call in forward.calls for seq in call)
    batcher.close()


def test_embed_awaits_without_blocking_the_event_loop():
    forward = GatedForward()
    batcher = EmbeddingBatcher("t", forward)

    async def main():
        task = asyncio.ensure_future(batcher.embed([[4, 4]]))
        ticks = 0
        while not forward.started.is_set():  # the loop keeps running while the worker works
            await asyncio.sleep(0.01)
            ticks += 1
        forward.gate.set()
        return await task, ticks

    out, _ = asyncio.run(main())
    assert out.tolist() == [[4, 2]]
    batcher.close()


class SteppedForward:
    """Each forward pass waits for its own `step()`: a test decides when each pass ends."""

    def __init__(self):
        self.calls: list[list[int]] = []  # first ids of each pass
        self._steps = threading.Semaphore(0)
        self._entered = threading.Semaphore(0)

    def __call__(self, batch):
        self.calls.append([seq[0] for seq in batch])
        self._entered.release()
        assert self._steps.acquire(timeout=10)
        return np.array([[seq[0], len(seq)] for seq in batch], dtype=np.float32)

    def wait_pass(self):
        assert self._entered.acquire(timeout=10)

    def step(self):
        self._steps.release()


def test_batch_jobs_wait_for_interactive_ones_queued_before_or_during_them():
    forward = SteppedForward()
    batcher = EmbeddingBatcher("t", forward, max_batch_tokens=2)
    first = batcher.submit([[1]])                                   # interactive, running
    forward.wait_pass()
    batch = batcher.submit([[100 + i] for i in range(4)], priority=1)  # two passes of 2
    early = batcher.submit([[2]])                                   # queued behind `first`
    forward.step()
    forward.wait_pass()  # `early` goes before the batch job queued before it
    forward.step()
    forward.wait_pass()  # the batch job's first pass
    late = batcher.submit([[3]])
    forward.step()
    forward.wait_pass()  # `late` runs before the batch job's second pass
    forward.step()
    forward.wait_pass()
    forward.step()
    assert forward.calls == [[1], [2], [100, 101], [3], [102, 103]]
    assert batch.result(5).tolist() == [[100 + i, 1] for i in range(4)]
    assert [f.result(5).tolist() for f in (first, early, late)] == [[[1, 1]], [[2, 1]], [[3, 1]]]
    batcher.close()


def test_closing_fails_the_batch_jobs_left_rather_than_leaving_them_waiting():
    forward = SteppedForward()
    batcher = EmbeddingBatcher("t", forward, max_batch_tokens=1)
    batch = batcher.submit([[100], [101]], priority=1)
    forward.wait_pass()
    late_batch = batcher.submit([[200]], priority=1)
    batcher.close()
    forward.step()
    forward.wait_pass()  # the running job finishes its passes
    forward.step()
    assert batch.result(5).tolist() == [[100, 1], [101, 1]]
    with pytest.raises(RuntimeError, match="closed"):
        late_batch.result(5)
