"""Asyncio front of the engine: ``generate`` / ``abort`` on the event loop, steps on a thread.

The model never runs on the HTTP event loop. Requests and aborts reach the engine
thread through a command queue; each step's outputs travel back to the waiting
coroutine through its own ``asyncio.Queue`` via ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from k2serve.engine.core import EngineCore
from k2serve.engine.sequence import GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


RESERVATION_TTL_S = 10.0  # how long an admitted request may take to start generating


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class EngineOverloaded(RuntimeError):
    """The running batch and the waiting queue are full; try again later."""


class AsyncEngine:
    def __init__(self, core: EngineCore | Callable[[], EngineCore], *, name: str = "engine"):
        """``core``: a built EngineCore, or a function that builds one — called on the engine
        thread itself, so the model's weights are created and first touched by the thread that
        runs it (measured here: steps on a thread other than the loading one ran ~20% slower,
        the two threads' OpenMP teams competing for the cores). Its exceptions are raised
        here."""
        factory = None if isinstance(core, EngineCore) else core
        self._core = core if factory is None else None
        self._commands: deque[tuple[str, Any]] = deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._stopped = False
        # Requests accepted and not yet finished, and (expiry times of) requests admitted by
        # `reserve` whose generation has not started yet; event loop thread only.
        self._in_flight = 0
        self._reservations: deque[float] = deque()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(factory,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        self.max_in_flight = self._core.config.max_num_seqs + self._core.config.max_waiting

    @property
    def core(self) -> EngineCore:
        return self._core

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yields one output per engine step for this request, the last with finish_reason.

        Closing the iterator early (client gone, stop string hit) aborts the request.
        """
        if self._stopped:
            raise EngineError("engine is shut down")
        if self._reservations:
            self._reservations.popleft()  # this request was admitted by reserve()
        elif self._in_flight >= self.max_in_flight:
            raise EngineOverloaded(f"{self._in_flight} requests are running or waiting, the "
                                   f"most this server queues")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
            self._streams[request.request_id] = (loop, queue)
        self._submit("add", request)
        self._in_flight += 1
        finished = False
        try:
            while True:
                output: RequestOutput = await queue.get()
                if output.error:
                    finished = True
                    raise EngineError(output.error)
                if output.finish_reason:
                    finished = True
                yield output
                if finished:
                    return
        finally:
            self._in_flight -= 1
            with self._streams_lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reserve(self, num_requests: int) -> None:
        """Admit requests now, before their generation starts (a streamed reply starts it
        only after its headers are sent), or raise EngineOverloaded."""
        now = time.monotonic()
        while self._reservations and self._reservations[0] < now:
            self._reservations.popleft()  # admitted but never started (client left)
        pending = self._in_flight + len(self._reservations)
        if pending + num_requests > self.max_in_flight:
            raise EngineOverloaded(f"{pending} requests are running or waiting, the most "
                                   f"this server queues is {self.max_in_flight}")
        self._reservations.extend([now + RESERVATION_TTL_S] * num_requests)

    def stats(self) -> dict[str, int]:
        return {**self._core.stats(), "in_flight": self._in_flight}

    def health(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # -- engine thread ------------------------------------------------------------------
    def _submit(self, kind: str, payload: Any) -> None:
        self._commands.append((kind, payload))
        self._wakeup.set()

    def _run(self, factory: Callable[[], EngineCore] | None) -> None:
        if factory is not None:
            try:
                self._core = factory()
            except BaseException as exc:  # noqa: BLE001 - handed to the constructor
                self._startup_error = exc
                self._ready.set()
                return
        self._ready.set()
        while not self._stopped:
            self._drain_commands()
            if not self._core.has_work():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self._core.step()
            except Exception as exc:  # a bug or OOM must not leave clients hanging
                log.exception("engine step failed")
                outputs = self._core.fail_all(f"engine error: {type(exc).__name__}: {exc}")
            self._deliver(outputs)

    def _drain_commands(self) -> None:
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "add":
                try:
                    self._core.add(payload)
                except Exception as exc:
                    self._deliver([RequestOutput(payload.request_id, [], None, "abort",
                                                 len(payload.prompt_ids), error=str(exc))])
            elif kind == "abort":
                self._core.abort(payload)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._streams_lock:
                target = self._streams.get(output.request_id)
            if target is None:  # the consumer went away; its abort is on the way
                continue
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, output)
            except RuntimeError:  # event loop closed
                pass
