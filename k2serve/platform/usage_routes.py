"""Usage per day and model, for the playground's chart: the caller's own (`GET /v1/usage`)
and, for an admin key, any key's (`GET /admin/usage/daily`; the middleware checks admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.request_scope import scope_state
from k2serve.errors import APIError
from k2serve.platform.timeparse import parse_since

router = APIRouter(responses=ERROR_RESPONSES)

DEFAULT_SINCE = "30d"


def _since(since: str | None) -> float:
    try:
        return parse_since(since or DEFAULT_SINCE)
    except ValueError as exc:
        raise APIError(400, str(exc), param="since", code="invalid_since") from exc


@router.get("/v1/usage")
async def own_usage(request: Request, since: str | None = None):
    """The calling key's usage per UTC day and model (open mode: the usage made without a
    key): requests, billed prompt / cached / completion tokens and cost. `since`: an ISO
    date or time, a Unix time, or a duration back from now (default `30d`)."""
    platform = request.app.state.platform
    key = scope_state(request.scope).caller
    since_ts = _since(since)
    rows = await run_in_threadpool(platform.usage_by_day, key=key, since=since_ts)
    return JSONResponse({"key": key.name if key else None, "since": since_ts, "data": rows})


@router.get("/admin/usage/daily")
async def usage_daily(request: Request, key: str | None = None, since: str | None = None):
    """Usage per UTC day, model and key: one key's (`key`: its name) or every key's."""
    platform = request.app.state.platform
    since_ts = _since(since)
    try:
        rows = await run_in_threadpool(platform.usage_by_day, key_name=key,
                                       every_key=key is None, since=since_ts)
    except LookupError as exc:
        raise APIError(404, exc.args[0], param="key", code="key_not_found") from exc
    if key is not None:
        rows = [dict(row, key=key) for row in rows]
    return JSONResponse({"key": key, "since": since_ts, "data": rows})
