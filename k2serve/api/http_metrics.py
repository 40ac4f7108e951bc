"""Every HTTP request counted and timed, by route (its path template, so ids in paths do not
multiply the series), method, status and served model."""

from __future__ import annotations

import time

from k2serve.api.request_scope import scope_state
from k2serve.telemetry.metrics import HTTP_LATENCY, HTTP_REQUESTS


class HttpMetricsMiddleware:
    """Sits inside the path alias (it sees the final path) and outside everything that may
    refuse a request (authentication, limits), so refusals are counted too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # the app raised before answering

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = _served_model(scope)
            HTTP_REQUESTS.labels(model, endpoint, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(model, endpoint).observe(time.perf_counter() - start)


def _served_model(scope) -> str:
    """The request's model if this server serves it; "" otherwise (a label never takes a
    client's arbitrary string)."""
    model = scope_state(scope).model
    if not model:
        return ""
    app = scope.get("app")
    registry = getattr(getattr(app, "state", None), "registry", None)
    if registry is None or registry.get(model) is None:
        return ""
    return model
