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
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from k2serve.engine import foreground
from k2serve.engine.core import EngineCore
from k2serve.engine.foreground import FOREGROUND
from k2serve.engine.sequence import GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


# Past its fair share of a full engine a key is refused; under its share it is admitted even
# when the engine is full, up to this many times the configured queue bound (the memory bound).
OVERFLOW_FACTOR = 2


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class EngineOverloaded(RuntimeError):
    """The running batch and the waiting queue are full; try again later."""


class ShareExceeded(EngineOverloaded):
    """The engine is full and this owner (API key) holds more than its fair share of it."""


class Reservation:
    """Engine capacity admitted for one caller's requests (an HTTP request's `n` choices).

    Each generation started with it turns one reserved slot into a running request, which
    `generate` gives back when it ends; `release()` gives back the slots never started. It is
    idempotent: call it in a `finally` (or use `with`) around everything between admission
    and the end of the reply, so no failure path keeps capacity (no timed leases).
    Event loop thread only.
    """

    def __init__(self, engine: AsyncEngine | None, owner: str | None, slots: int,
                 priority: int = 0):
        self._engine = engine
        self.owner = owner
        self.unstarted = slots
        self.priority = priority  # of the requests it starts (GenerationRequest.priority)

    def start_one(self) -> None:
        """One slot starts generating: generate() counts it as in flight from now on."""
        self.unstarted -= 1
        if self._engine is not None:
            self._engine._reserved -= 1

    def release(self) -> None:
        slots, self.unstarted = self.unstarted, 0
        if slots and self._engine is not None:
            self._engine._reserved -= slots
            if self.priority == 0:
                self._engine._interactive_coming -= slots
            self._engine._drop(self.owner, slots)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
        # Event loop thread only: requests generating (accepted, not finished), slots of
        # reservations not started yet, and both together per owner (API key).
        self._in_flight = 0
        self._reserved = 0
        # Interactive slots admitted and not yet handed to the engine thread (read there:
        # batch-only steps wait for them, see _run), and when the last was admitted.
        self._interactive_coming = 0
        self._interactive_admitted_at = 0.0
        self._held: Counter[str | None] = Counter()
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

    async def generate(self, request: GenerationRequest, reservation: Reservation | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yields one output per engine step for this request, the last with finish_reason.

        `reservation`: capacity admitted earlier by `reserve` for `request.owner` (one of
        its slots is used); without one the request is admitted here, or EngineOverloaded
        is raised.
        Closing the iterator early (client gone, stop string hit) aborts the request.
        """
        if self._stopped:
            raise EngineError("engine is shut down")
        with self._streams_lock:
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
        owner = request.owner
        coming = reservation is not None and reservation.unstarted > 0 and \
            reservation.priority == 0  # one of the interactive slots _run waits for
        if reservation is not None and reservation.unstarted:
            owner = reservation.owner  # its slot is counted against the reservation's owner
            reservation.start_one()
        else:  # no reservation, or one released already: admitted on its own
            self._admit(owner, 1)
        self._in_flight += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            self._streams[request.request_id] = (loop, queue)
        finished = False
        try:
            self._submit("add", request)
            if coming:  # it is in the engine's queue now
                coming = False
                self._interactive_coming -= 1
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
            if coming:
                self._interactive_coming -= 1
            self._in_flight -= 1
            self._drop(owner, 1)
            with self._streams_lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reserve(self, num_requests: int, owner: str | None = None, priority: int = 0
                ) -> Reservation:
        """Admit `num_requests` requests of `owner` (an API key id; None: anonymous) now,
        before their generation starts (a streamed reply starts it only after its headers are
        sent), or raise EngineOverloaded / ShareExceeded. Release the result when done.
        `priority`: of the requests in the engine's queue (0 interactive, 1 batch)."""
        self._admit(owner, num_requests)
        self._reserved += num_requests
        if priority == 0:
            self._interactive_coming += num_requests
            self._interactive_admitted_at = time.monotonic()
        return Reservation(self, owner, num_requests, priority)

    def _admit(self, owner: str | None, count: int) -> None:
        """Count `count` more requests for `owner`, or refuse them.

        Idle capacity (up to max_in_flight) goes to whoever asks. Beyond it, an owner under
        its fair share (max_in_flight split between the owners holding capacity, this one
        included) is still admitted, up to OVERFLOW_FACTOR x max_in_flight in all, so one key
        flooding the queue cannot lock the others out; an owner past its share is refused.
        """
        total = self._in_flight + self._reserved
        if total + count > self.max_in_flight:
            held = self._held[owner]
            owners = len(self._held) + (owner not in self._held)
            share = max(1, self.max_in_flight // owners)
            if owners > 1 and held + count > share and held:
                raise ShareExceeded(
                    f"this API key has {held} requests running or waiting, its share of this "
                    f"server's {self.max_in_flight} while {owners} keys are using it is {share}")
            if held + count > share or total + count > self.max_in_flight * OVERFLOW_FACTOR:
                raise EngineOverloaded(f"{total} requests are running or waiting, the most "
                                       f"this server queues is {self.max_in_flight}")
        self._held[owner] += count

    def _drop(self, owner: str | None, count: int) -> None:
        self._held[owner] -= count
        if self._held[owner] <= 0:
            del self._held[owner]  # len(_held): the owners holding capacity now

    def stats(self) -> dict[str, int]:
        held = self._in_flight + self._reserved
        return {**self._core.stats(), "in_flight": self._in_flight, "reserved": self._reserved,
                "capacity": self.max_in_flight, "capacity_free": max(0, self.max_in_flight - held),
                "owners": len(self._held)}

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
            if self._interactive_on_its_way() and not self._core.has_urgent_work():
                # An interactive request is on its way: leave it the CPU (see foreground.py).
                self._wakeup.wait(0.005)
                self._wakeup.clear()
                continue
            try:
                outputs = self._core.step()
            except Exception as exc:  # a bug or OOM must not leave clients hanging
                log.exception("engine step failed")
                outputs = self._core.fail_all(f"engine error: {type(exc).__name__}: {exc}")
            self._deliver(outputs)

    def _interactive_on_its_way(self) -> bool:
        """An interactive request is being prepared (FOREGROUND), or admitted here and not
        yet in the engine's queue (its reply's headers, its sampling parameters: a batch-only
        step started now would delay its first token by a whole step). Either for at most
        foreground.MAX_HOLD_S, so a slot never started cannot stop background work."""
        if FOREGROUND.pending():
            return True
        return self._interactive_coming > 0 and \
            time.monotonic() - self._interactive_admitted_at < foreground.MAX_HOLD_S

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
