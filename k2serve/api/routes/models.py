"""GET /v1/models — one body per client family (API_NOTES §1.2).

Together's native reply is a bare JSON array (Together 1.x asserts it); the OpenAI SDKs
need {"object": "list", "data": [...]}. The User-Agent decides, as no body suits both.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.models_lookup import registry_of
from k2serve.errors import APIError

router = APIRouter(responses=ERROR_RESPONSES)


def _model_object(spec) -> dict:
    # A model without a context (speech, transcription) leaves context_length out: Together's
    # schema types it as an integer, not null.
    obj = spec.as_model_object()
    if obj.get("context_length") is None:
        obj.pop("context_length", None)
    return obj


def wants_openai_shape(request: Request) -> bool:
    return "openai" in request.headers.get("user-agent", "").lower()


@router.get("/v1/models")
async def list_models(request: Request, dedicated: bool | None = None):
    models = [_model_object(spec) for spec in registry_of(request).listed()]
    if wants_openai_shape(request):
        return JSONResponse({"object": "list", "data": models})
    return JSONResponse(models)


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    entry = registry_of(request).get(model_id)
    if entry is None:
        raise APIError(404, f"The model '{model_id}' does not exist or is not served here.",
                       param="model", code="model_not_found")
    return JSONResponse(_model_object(entry[0]))
