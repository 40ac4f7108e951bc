"""The batch runner starts no line while an interactive request is in flight (at most
MAX_LINE_WAIT_S), and a batch cancelled while it waits gives its slot back."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from k2serve.api import batch_runner
from k2serve.api.batch_input import BatchLine
from k2serve.api.batch_store import BatchRecord
from k2serve.engine.foreground import ForegroundGate


class RecordingApp:
    """An ASGI app that answers every line with 200 and notes when each one began."""

    def __init__(self):
        self.started: list[tuple[str, float]] = []
        self.state = SimpleNamespace(batch_store=SimpleNamespace(
            save_line=lambda result: None, save_batch=lambda record: None))

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.started.append((body["n"], time.monotonic()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


def record() -> BatchRecord:
    now = time.time()
    return BatchRecord(id="batch-1", owner=None, input_file_id="file-1",
                       endpoint="/v1/chat/completions", completion_window="24h",
                       created_at=now, deadline=now + 3600)


def lines(count: int) -> list[BatchLine]:
    return [BatchLine(i + 1, f"c{i}", None, {"n": i}) for i in range(count)]


@pytest.fixture
def gate(monkeypatch):
    gate = ForegroundGate()
    monkeypatch.setattr(batch_runner, "FOREGROUND", gate)
    return gate


def test_no_line_starts_while_an_interactive_request_is_in_flight(gate):
    app = RecordingApp()
    runner = batch_runner.BatchRunner(app, concurrency=2)

    async def main():
        gate.enter()  # an interactive request arrives before the batch runs
        run = asyncio.create_task(runner._run_lines(record(), lines(3)))
        await asyncio.sleep(0.3)
        assert app.started == []
        left = time.monotonic()
        gate.leave()
        await run
        return left

    left = asyncio.run(main())
    assert [n for n, _ in app.started] == [0, 1, 2]
    assert all(at >= left for _, at in app.started)


def test_under_steady_interactive_load_lines_still_start_after_the_longest_wait(gate,
                                                                               monkeypatch):
    monkeypatch.setattr(batch_runner, "MAX_LINE_WAIT_S", 0.2)
    app = RecordingApp()
    runner = batch_runner.BatchRunner(app, concurrency=1)
    gate.enter()  # never leaves
    began = time.monotonic()
    asyncio.run(runner._run_lines(record(), lines(2)))
    assert [n for n, _ in app.started] == [0, 1]
    assert app.started[0][1] - began >= 0.2


def test_a_batch_cancelled_while_it_waits_gives_its_slot_back(gate):
    app = RecordingApp()
    runner = batch_runner.BatchRunner(app, concurrency=1)

    async def main():
        gate.enter()
        waiting = asyncio.create_task(runner._run_lines(record(), lines(1)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        gate.leave()
        await asyncio.wait_for(runner._run_lines(record(), lines(1)), 5)

    asyncio.run(main())
    assert [n for n, _ in app.started] == [0]
