"""Together's dedicated-endpoint API: /v1/endpoints and /v1/hardware, in Together's shapes.

Each key sees and changes its own endpoints (an admin key all of them). Without
`k2serve serve --ray` there are none: the lists are empty and a create says how to enable
them.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.request_scope import request_scope
from k2serve.errors import APIError, bad_request

router = APIRouter(responses=ERROR_RESPONSES)


def _manager(request: Request, required: bool = True):
    manager = getattr(request.app.state, "endpoints", None)
    if manager is None and required:
        raise APIError(400, "Dedicated endpoints are not enabled on this server: start it "
                            "with `k2serve serve --ray [ADDRESS]`.",
                       code="dedicated_endpoints_disabled")
    return manager


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


@router.get("/v1/endpoints")
async def list_endpoints(request: Request, type: str | None = None, mine: bool = False,
                         usage_type: str | None = None):
    if type not in (None, "dedicated", "serverless"):
        raise bad_request("'type' must be dedicated or serverless.", param="type")
    manager = _manager(request, required=False)
    data = [] if manager is None else await run_in_threadpool(
        manager.list, request_scope(request).caller, mine=mine, type=type)
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/endpoints")
async def create_endpoint(request: Request):
    manager = _manager(request)
    body = await _body(request)
    return JSONResponse(await run_in_threadpool(manager.create, request_scope(request).caller,
                                                body))


@router.get("/v1/endpoints/{endpoint_id}")
async def get_endpoint(endpoint_id: str, request: Request):
    manager = _manager(request)
    return JSONResponse(await run_in_threadpool(manager.get, request_scope(request).caller,
                                                endpoint_id))


@router.patch("/v1/endpoints/{endpoint_id}")
async def update_endpoint(endpoint_id: str, request: Request):
    manager = _manager(request)
    body = await _body(request)
    return JSONResponse(await run_in_threadpool(
        manager.update, request_scope(request).caller, endpoint_id, body))


@router.delete("/v1/endpoints/{endpoint_id}")
async def delete_endpoint(endpoint_id: str, request: Request):
    manager = _manager(request)
    await run_in_threadpool(manager.delete, request_scope(request).caller, endpoint_id)
    return Response(status_code=204)


@router.get("/v1/hardware")
async def list_hardware(request: Request, model: str | None = None):
    manager = _manager(request, required=False)
    data = [] if manager is None else await run_in_threadpool(manager.hardware, model)
    return JSONResponse({"object": "list", "data": data})
