"""The request id of the work running now, for log lines and spans made far from the request
(a worker thread, a usage sink): set once by the outermost middleware, carried by contextvars
into tasks and threadpool calls."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("k2serve_request_id", default=None)


def current_request_id() -> str | None:
    return REQUEST_ID.get()
