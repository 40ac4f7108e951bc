"""together 3.x's dedicated endpoints: /v2/projects/{project_id}/endpoints[/{id}], a thin
translation (k2serve.platform.endpoints_v2) over the same manager as /v1/endpoints, with its
ownership rules and error shapes. The project id is echoed: k2serve has no projects.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.request_scope import request_scope
from k2serve.errors import APIError, bad_request
from k2serve.platform import endpoints_v2 as v2
from k2serve.platform.endpoints_routes import _body, _manager

router = APIRouter(responses=ERROR_RESPONSES)
BASE = "/v2/projects/{project_id}/endpoints"


@router.get(BASE)
async def list_endpoints(project_id: str, request: Request, after: str | None = None,
                         limit: int | None = None, order_by: str | None = None,
                         filter: str | None = None):
    order_by = order_by or request.query_params.get("orderBy")  # the SDK's wire name
    if filter:
        raise bad_request("'filter' is not supported here; list without it.", param="filter")
    manager = _manager(request, required=False)
    if manager is None:
        return JSONResponse({"object": "list", "data": [], "next_cursor": None})
    caller = request_scope(request).caller

    def work():
        ids = [e["id"] for e in manager.list(caller)]
        chunk, cursor = v2.page(ids, after, limit, order_by)
        return [v2.to_v2(manager.get(caller, i), project_id) for i in chunk], cursor

    data, cursor = await run_in_threadpool(work)
    return JSONResponse({"object": "list", "data": data, "next_cursor": cursor})


@router.post(BASE)
async def create_endpoint(project_id: str, request: Request):
    manager = _manager(request)
    body = v2.create_body(await _body(request))
    obj = await run_in_threadpool(manager.create, request_scope(request).caller, body)
    return JSONResponse(v2.to_v2(obj, project_id))


@router.get(BASE + "/{endpoint_id}")
async def get_endpoint(project_id: str, endpoint_id: str, request: Request):
    manager = _manager(request)
    obj = await run_in_threadpool(manager.get, request_scope(request).caller, endpoint_id)
    return JSONResponse(v2.to_v2(obj, project_id))


@router.patch(BASE + "/{endpoint_id}")
async def update_endpoint(project_id: str, endpoint_id: str, request: Request,
                          update_mask: str | None = None):
    manager = _manager(request)
    body = await _body(request)
    caller = request_scope(request).caller
    update_mask = update_mask or request.query_params.get("updateMask")  # the SDK's name
    changes = v2.update_body(body, endpoint_id, update_mask)

    def work():
        v2.check_etag(manager.get(caller, endpoint_id), body.get("etag"))
        return manager.update(caller, endpoint_id, changes)

    return JSONResponse(v2.to_v2(await run_in_threadpool(work), project_id))


@router.delete(BASE + "/{endpoint_id}")
async def delete_endpoint(project_id: str, endpoint_id: str, request: Request,
                          etag: str | None = None):
    manager = _manager(request)
    caller = request_scope(request).caller

    def work():
        v2.check_etag(manager.get(caller, endpoint_id), etag)
        manager.delete(caller, endpoint_id)

    await run_in_threadpool(work)
    return JSONResponse({})


@router.get("/v2/public/inference-instance-types")
async def list_instance_types(request: Request):
    manager = _manager(request, required=False)
    data = [] if manager is None else await run_in_threadpool(manager.hardware)
    return JSONResponse({"object": "list", "data": [v2.hardware_to_v2(h) for h in data],
                         "next_cursor": None})


@router.get("/v2/public/inference-instance-types/{instance_type}")
async def get_instance_type(instance_type: str, request: Request):
    manager = _manager(request, required=False)
    data = [] if manager is None else await run_in_threadpool(manager.hardware)
    for hardware in data:
        if hardware["id"] == instance_type:
            return JSONResponse(v2.hardware_to_v2(hardware))
    raise APIError(404, f"No hardware '{instance_type}' this cluster can place; see GET "
                        f"/v2/public/inference-instance-types.", param="id",
                   code="hardware_not_found")
