"""Every HTTP request counted and timed, by route (its path template, so ids in paths do not
multiply the series), method, status and served model."""

from __future__ import annotations

import re
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
            endpoint = _endpoint(scope)
            model = _served_model(scope)
            HTTP_REQUESTS.labels(model, endpoint, scope["method"], str(status)).inc()
            HTTP_LATENCY.labels(model, endpoint).observe(time.perf_counter() - start)


def _endpoint(scope) -> str:
    """The route's path template; for a request refused before routing (a 401, a 429 from
    the platform) the template its path matches; "unmatched" for none."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    if app is None:
        return "unmatched"
    for pattern, template in _templates(app):
        if pattern.match(scope["path"]):
            return template
    return "unmatched"


_PARAM = re.compile(r"\\\{[^/]*?\\\}")  # a path parameter, once re.escape'd: \{file_id\}


def _templates(app) -> list[tuple[re.Pattern, str]]:
    """The app's path templates (its OpenAPI paths, and /metrics), as patterns; made once."""
    cached = getattr(app.state, "metrics_route_templates", None)
    if cached is None:
        try:
            paths = [*app.openapi().get("paths", {}), "/metrics"]
        except Exception:  # a label is not worth failing a request for
            paths = ["/metrics"]
        cached = [(re.compile("^" + _PARAM.sub("[^/]+", re.escape(p)) + "$"), p) for p in paths]
        app.state.metrics_route_templates = cached
    return cached


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
