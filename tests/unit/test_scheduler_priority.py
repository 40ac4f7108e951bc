"""Scheduler priorities: interactive requests (0) before a batch job's lines (1), FIFO within
a priority; a waiting interactive request preempts running batch lines when it does not fit;
when KV blocks run out a batch line gives way first; unless priorities mix, batch lines
compute only in steps no interactive sequence needs."""

from __future__ import annotations

import time
from types import SimpleNamespace

from k2serve.engine import foreground
from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.block_manager import BlockManager
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.scheduler import Scheduler, SchedulerConfig
from k2serve.engine.sequence import GenerationRequest, Sequence, SequenceStatus

BLOCK = 4


def make(num_blocks=64, max_num_seqs=8, budget=64, mix=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), SchedulerConfig(max_num_seqs, budget, mix))


def seq(name: str, priority: int = 0, prompt: int = 3, owner: str | None = None) -> Sequence:
    # distinct prompts: no prefix sharing between the test's sequences
    ids = [hash(name) % 1000 + 10 + i for i in range(prompt)]
    return Sequence(GenerationRequest(name, ids, SamplingParams(max_tokens=64), owner=owner,
                                      priority=priority))


def step(s: Scheduler) -> list[str]:
    """Run one step as the engine would (a token sampled once a prompt is in); the names
    of the sequences computed, in the batch's order."""
    batch = s.schedule()
    for q, count in batch:
        q.num_computed += count
        if q.num_computed == q.num_tokens:
            q.output_ids.append(5)
    return [q.request_id for q, _ in batch]


def test_interactive_admitted_before_earlier_batch_lines_fifo_within_priority():
    s = make(max_num_seqs=2, mix=True)
    for q in (seq("b1", 1), seq("b2", 1), seq("i1"), seq("i2")):
        s.add(q)
    assert step(s) == ["i1", "i2"]  # only two slots: both interactive, oldest first
    assert [q.request_id for q in s.waiting] == ["b1", "b2"]


def test_a_waiting_interactive_request_preempts_the_newest_batch_line():
    s = make(max_num_seqs=2, mix=True)
    b1, b2 = seq("b1", 1), seq("b2", 1)
    s.add(b1)
    s.add(b2)
    assert step(s) == ["b1", "b2"]
    s.add(seq("i1"))
    assert step(s) == ["b1", "i1"]  # b2 (the newest batch line) gave its slot
    assert b2.status is SequenceStatus.WAITING and b2.num_preemptions == 1
    assert s.waiting[0] is b2  # first of the batch lines when room comes back
    # A batch line never preempts another batch line, nor an interactive one.
    s.add(seq("b3", 1))
    assert "b3" not in step(s) and s.num_preemptions == 1


def test_when_kv_runs_out_a_batch_line_gives_way_even_if_older():
    # 3 blocks of 4 tokens: two 4-token prompts fill two blocks; the next decode of each
    # needs a new block and there is one left.
    s = make(num_blocks=3, mix=True)
    b1, i1 = seq("b1", 1, prompt=4), seq("i1", 0, prompt=4)
    s.add(b1)
    assert step(s) == ["b1"]
    s.add(i1)
    assert step(s) == ["b1", "i1"]  # b1 decodes (takes the last block), i1 prefills
    # i1's first decode needs a block: b1, older but less urgent, is preempted, not i1 (the
    # newest, which the newest-gives-way rule alone would pick).
    assert step(s) == ["i1"]
    assert b1.status is SequenceStatus.WAITING and i1.status is SequenceStatus.RUNNING


def test_unmixed_batch_lines_wait_while_interactive_work_runs_and_resume_after():
    s = make()
    b1 = seq("b1", 1)
    s.add(b1)
    assert step(s) == ["b1"]  # idle engine: the batch line runs
    i1 = seq("i1")
    s.add(i1)
    assert step(s) == ["i1"]  # b1 keeps its KV blocks but computes nothing
    assert step(s) == ["i1"]
    assert b1.status is SequenceStatus.RUNNING and len(b1.output_ids) == 1
    s.add(seq("b2", 1))
    assert step(s) == ["i1"]  # nor is a new batch line admitted meanwhile
    s.remove(i1)
    assert step(s) == ["b1", "b2"]  # interactive work gone: the batch progresses
    assert len(b1.output_ids) == 2


def test_owners_share_fairly_within_a_priority():
    s = make(max_num_seqs=3, mix=True)
    for q in (seq("a1", owner="a"), seq("a2", owner="a"), seq("b1", owner="b"),
              seq("x1", 1, owner="c")):
        s.add(q)
    assert step(s) == ["a1", "b1", "a2"]  # fair between keys, interactive before batch


def test_a_step_of_batch_work_alone_is_short():
    """An interactive request arriving mid-step waits for at most a short step: batch
    prompts go in background_step_tokens chunks, interactive ones in max_step_tokens."""
    s = Scheduler(BlockManager(64, BLOCK), SchedulerConfig(8, 64, False, 8))
    b1 = seq("b1", 1, prompt=20)
    s.add(b1)
    assert s.schedule() == [(b1, 8)]
    b1.num_computed += 8
    s.add(seq("i1", prompt=20))
    assert [(q.request_id, n) for q, n in s.schedule()] == [("i1", 20)]


def test_an_interactive_request_never_waits_for_a_batch_lines_prefix():
    """Unmixed, batch lines do not compute while interactive work runs: an interactive
    request sharing a prefix a batch line is computing computes it itself (an interactive
    request sharing another interactive one's still waits for it, as before)."""
    s = Scheduler(BlockManager(64, BLOCK), SchedulerConfig(8, 64, False, 4))
    shared = [11, 12, 13, 14, 15, 16, 17, 18]
    b1 = Sequence(GenerationRequest("b1", shared + [1, 2], SamplingParams(max_tokens=8),
                                    priority=1))
    s.add(b1)
    assert step(s) == ["b1"]  # a 4-token chunk: its prefix's blocks are in flight
    i1 = Sequence(GenerationRequest("i1", shared + [3, 4], SamplingParams(max_tokens=8)))
    s.add(i1)
    assert step(s) == ["i1"] and i1.status is SequenceStatus.RUNNING
    i2 = Sequence(GenerationRequest("i2", [11, 12, 13, 14, 99, 98, 97, 96, 95],
                                    SamplingParams(max_tokens=8)))
    a = Sequence(GenerationRequest("a", [11, 12, 13, 14, 99, 98, 97, 96, 1],
                                   SamplingParams(max_tokens=8)))
    s2 = Scheduler(BlockManager(64, BLOCK), SchedulerConfig(8, 4, False, 4))
    s2.add(a)
    assert step(s2) == ["a"]  # 4 of its 9 tokens: its second block in flight
    s2.add(i2)
    assert step(s2) == ["a"]  # i2 waits to share a's block rather than compute it twice


class BackgroundOnly:
    """An engine core that always has batch work, and counts the steps it runs."""

    config = SimpleNamespace(max_num_seqs=4, max_waiting=4)
    steps = 0

    def has_work(self):
        return True

    def has_urgent_work(self):
        return False

    def step(self):
        self.steps += 1
        time.sleep(0.001)
        return []


def test_background_steps_wait_while_an_interactive_request_is_prepared(monkeypatch):
    """An engine with only batch work runs no step while an interactive request is on its
    way (parsed, tokenized: the CPU is its), and resumes once it is admitted, or after
    MAX_HOLD_S at most."""
    gate = foreground.ForegroundGate()
    monkeypatch.setattr("k2serve.engine.async_engine.FOREGROUND", gate)
    engine = AsyncEngine(BackgroundOnly)
    try:
        time.sleep(0.05)
        assert engine.core.steps > 0  # idle capacity: the batch runs
        gate.hold()
        time.sleep(0.02)
        paused_at = engine.core.steps
        time.sleep(0.2)
        assert engine.core.steps == paused_at  # no step while the request is prepared
        gate.release()
        time.sleep(0.05)
        assert engine.core.steps > paused_at
        monkeypatch.setattr(foreground, "MAX_HOLD_S", 0.1)
        gate.hold()  # never released: the hold lapses
        time.sleep(0.3)
        assert engine.core.steps > paused_at + 1
    finally:
        engine.shutdown()


def test_background_steps_wait_for_an_admitted_interactive_request_to_reach_the_engine(
        monkeypatch):
    """Between its admission (reserve) and its generation's start (after its reply's headers)
    an interactive request is on its way too: a batch-only step begun then would delay its
    first token by a whole step. A batch line's reservation pauses nothing; a slot never
    started pauses batch work for MAX_HOLD_S at most."""
    monkeypatch.setattr("k2serve.engine.async_engine.FOREGROUND", foreground.ForegroundGate())
    engine = AsyncEngine(BackgroundOnly)

    def steps_during(seconds):
        before = engine.core.steps
        time.sleep(seconds)
        return engine.core.steps - before

    try:
        assert steps_during(0.05) > 0
        batch_line = engine.reserve(1, priority=1)
        assert steps_during(0.05) > 0  # a batch line's admission pauses nothing
        interactive = engine.reserve(2, owner="key")
        time.sleep(0.02)
        assert steps_during(0.2) == 0  # admitted, not yet in the engine: batch work waits
        interactive.release()  # (its reply ended before its generation started)
        assert steps_during(0.05) > 0
        monkeypatch.setattr(foreground, "MAX_HOLD_S", 0.1)
        forgotten = engine.reserve(1)
        time.sleep(0.15)
        assert steps_during(0.1) > 0  # the pause lapsed
        forgotten.release()
        batch_line.release()
    finally:
        engine.shutdown()
