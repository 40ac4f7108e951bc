"""Per-request usage accounting, reported when the request ends.

A generation's tracker sees every delta of every choice, so a stream the client drops
mid-way is still counted for the tokens it produced. When it ends, its record goes to the
app's sinks (plain callables on `app.state.usage_sinks`: the log line) and to the request's
own observer (`RequestScope.usage`: the platform's ledger), once, on the event loop; neither
may raise. While it generates, the observer also gets a snapshot (status `in_progress`)
every PROGRESS_S, so the ledger holds the tokens produced so far should the server die.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fastapi import Request

from k2serve.api.request_scope import request_scope
from k2serve.serving.backend import TextDelta
from k2serve.telemetry.metrics import INTER_TOKEN

log = logging.getLogger("k2serve.requests")

UsageSink = Callable[["UsageRecord"], None]

PROGRESS_S = 2.0  # how often a running generation reports its tokens so far


@dataclass
class UsageRecord:
    request_id: str
    model: str
    endpoint: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"  # ok | error | client_closed | content_filter (k2serve.safety)
    error: str | None = None
    ttft_s: float | None = None
    duration_s: float = 0.0
    started_at: float = field(default_factory=time.time)
    api_key_id: str | None = None  # set by the auth layer, when there is one
    finish_reason: str | None = None  # the first choice's (stop, length, tool_calls, ...)
    queue_s: float | None = None  # our engine: waited this long before it was first scheduled

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageTracker:
    def __init__(self, request: Request, model: str, endpoint: str, prompt_tokens: int, n: int):
        self._request = request
        self._scope = rs = request_scope(request)
        self._start = time.perf_counter()
        self._completion = [0] * n
        self._done = False
        self._marked: tuple[str, str | None] | None = None
        self._next_progress = time.monotonic() + PROGRESS_S
        self._progress_timer: asyncio.TimerHandle | None = None
        self.record = UsageRecord(request_id=rs.request_id, model=model, endpoint=endpoint,
                                  prompt_tokens=prompt_tokens, api_key_id=rs.api_key_id)
        rs.model = model
        self._last_token_at: list[float | None] = [None] * n  # per choice: inter-token gaps
        self._inter_token = INTER_TOKEN.labels(model)
        if rs.usage is not None:
            rs.usage.started(self)

    def on_delta(self, index: int, delta: TextDelta) -> None:
        if delta.token_ids or delta.text:  # upstreams send text
            now = time.perf_counter()
            if self.record.ttft_s is None:
                self.record.ttft_s = now - self._start
            last = self._last_token_at[index]
            tokens = max(1, delta.completion_tokens - self._completion[index])
            if last is not None:
                self._inter_token.observe((now - last) / tokens)
            self._last_token_at[index] = now
        if delta.scheduled_ns is not None and self.record.queue_s is None:
            self.record.queue_s = max(0.0, delta.scheduled_ns / 1e9 - self.record.started_at)
        self._completion[index] = delta.completion_tokens
        if index == 0:
            self.record.cached_tokens = delta.cached_tokens
            if delta.finish_reason:
                self.record.finish_reason = delta.finish_reason
        # Every token is reported within PROGRESS_S of being produced: now, or by a timer
        # (the engine may stall right after a token the client has already been sent).
        now = time.monotonic()
        if now >= self._next_progress:
            self._report_progress()
        elif self._progress_timer is None:
            try:
                self._progress_timer = asyncio.get_running_loop().call_later(
                    self._next_progress - now, self._report_progress)
            except RuntimeError:  # no event loop (a direct caller): report on the next delta
                pass

    def set_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A request that is not a text generation (an image, a video): its whole usage at
        once, when its work is done (k2serve.diffusion.serving says what its tokens count)."""
        self.record.prompt_tokens = prompt_tokens
        self._completion[0] = completion_tokens

    def snapshot(self) -> "UsageRecord":
        """The usage so far, as a record with status `in_progress`."""
        return dataclasses.replace(self.record, completion_tokens=sum(self._completion),
                                   status="in_progress",
                                   duration_s=time.perf_counter() - self._start)

    def _report_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self._next_progress = time.monotonic() + PROGRESS_S
        observer = self._scope.usage
        if self._done or observer is None:
            return
        try:
            observer.progress(self.snapshot())
        except Exception:  # accounting must not break the generation
            log.exception("usage progress observer failed")

    def mark(self, status: str, error: str | None = None) -> None:
        """A final status decided above the generation (the safety guard's
        `content_filter`): finish() reports it unless the generation failed."""
        self._marked = (status, error)

    def finish(self, status: str, error: str | None = None) -> None:
        if self._done:
            return
        if status != "error" and self._marked is not None:
            status, error = self._marked
        self._done = True
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        self.record.completion_tokens = sum(self._completion)
        self.record.status = status
        self.record.error = error
        self.record.duration_s = time.perf_counter() - self._start
        for sink in self._request.app.state.usage_sinks:
            try:
                sink(self.record)
            except Exception:  # a broken sink must not break the reply
                log.exception("usage sink failed")
        if self._scope.usage is not None:
            try:
                self._scope.usage.finished(self.record)
            except Exception:
                log.exception("usage observer failed")


def log_usage(record: UsageRecord) -> None:
    """One structured line per generation; no prompt or output text."""
    fields = asdict(record)
    fields["total_tokens"] = record.total_tokens
    log.info(json.dumps(fields, separators=(",", ":")))
