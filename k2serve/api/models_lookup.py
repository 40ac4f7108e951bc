"""Resolve a request's `model` to its backend, with the errors a user can act on."""

from __future__ import annotations

from fastapi import Request

from k2serve.api.errors import APIError
from k2serve.serving.registry import ModelRegistry
from k2serve.serving.text_backend import TextBackend

TEXT_TYPES = ("chat", "language", "code")


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def text_backend_for(request: Request, model_id: str) -> TextBackend:
    registry = registry_of(request)
    entry = registry.get(model_id)
    if entry is None:
        available = ", ".join(sorted(s.id for s in registry.specs())) or "none"
        raise APIError(404, f"The model '{model_id}' does not exist or is not served here. "
                            f"Available models: {available}.", param="model",
                       code="model_not_found")
    spec, backend = entry
    if spec.type not in TEXT_TYPES or not isinstance(backend, TextBackend):
        raise APIError(400, f"The model '{model_id}' is a {spec.type} model and cannot serve "
                            f"text generation.", param="model", code="model_not_supported")
    return backend
