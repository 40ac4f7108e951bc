"""Endpoints of model types this server has no model for yet.

They exist so that a request gets an answer a user can act on — which model types are
served, and what the named model can do — instead of an unknown-path 404. A route here
goes away when its model type is served.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.models_lookup import registry_of
from k2serve.errors import APIError

router = APIRouter(responses=ERROR_RESPONSES)

# path -> (model type it needs, what it does)
ENDPOINTS = {
    "/v1/images/generations": ("image", "generate images"),
    "/v2/videos": ("video", "generate videos"),
    "/v1/videos": ("video", "generate videos"),
}


async def _model_of(request: Request) -> str | None:
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
            model = (await request.form()).get("model")
        else:
            body = await request.json()
            model = body.get("model") if isinstance(body, dict) else None
    except Exception:
        return None
    return model if isinstance(model, str) else None


def _unsupported(path: str):
    needed, action = ENDPOINTS[path]

    async def endpoint(request: Request):
        registry = registry_of(request)
        model = await _model_of(request)
        served = ", ".join(f"{s.id} ({s.type})" for s in registry.specs())
        if model is None:
            raise APIError(400, "Missing required parameter: 'model'.", param="model")
        entry = registry.get(model)
        if entry is None:
            raise APIError(404, f"The model '{model}' does not exist or is not served here. "
                                f"Served models: {served}.", param="model",
                           code="model_not_found")
        raise APIError(400, f"The model '{model}' is a {entry[0].type} model and cannot "
                            f"{action}; this server has no {needed} model configured. "
                            f"Served models: {served}.", param="model",
                       code="model_not_supported")

    return endpoint


for _path in ENDPOINTS:
    router.add_api_route(_path, _unsupported(_path), methods=["POST"],
                         summary=f"{ENDPOINTS[_path][1]} (no {ENDPOINTS[_path][0]} model yet)")
