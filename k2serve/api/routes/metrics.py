"""GET /metrics: Prometheus' text format (README: Metrics). The platform asks for an admin
key here, as for /admin, unless the server runs open."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from k2serve.api.live_metrics import exposition

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = exposition(request.app)
    return Response(body, media_type=content_type)
