"""GET /admin/usage — the ledger's totals, as `k2serve usage --json` prints them.

Admin only: the middleware lets through keys made with `k2serve keys create --admin` (and
everyone while the server runs open on loopback with no key made yet).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.errors import APIError
from k2serve.platform.timeparse import parse_since

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/admin/usage")
async def admin_usage(request: Request, key: str | None = None, since: str | None = None):
    """Per-key totals: requests, billed requests, prompt / cached / completion tokens, cost.

    `key`: a key's name; `since`: an ISO date or time (UTC unless it says otherwise), a Unix
    time, or a duration back from now (`30m`, `24h`, `7d`)."""
    platform = request.app.state.platform  # mounted by Platform.install
    try:
        since_ts = parse_since(since) if since else None
    except ValueError as exc:
        raise APIError(400, str(exc), param="since", code="invalid_since") from exc
    try:
        totals = await run_in_threadpool(platform.usage_totals, key_name=key, since=since_ts)
    except LookupError as exc:
        raise APIError(404, exc.args[0], param="key", code="key_not_found") from exc
    return JSONResponse(totals)
