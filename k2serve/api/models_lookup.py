"""Resolve a request's `model` to its backend, with the errors a user can act on."""

from __future__ import annotations

from fastapi import Request

from k2serve.errors import APIError
from k2serve.serving.backend import GenerationBackend
from k2serve.serving.registry import ModelRegistry, ServedModel

TEXT_TYPES = ("chat", "language", "code")


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _entry_or_404(registry: ModelRegistry, model_id: str) -> ServedModel:
    """The served model, or the 404 naming the models that are served."""
    entry = registry.get(model_id)
    if entry is None:
        available = ", ".join(sorted(s.id for s in registry.specs())) or "none"
        raise APIError(404, f"The model '{model_id}' does not exist or is not served here. "
                            f"Available models: {available}.", param="model",
                       code="model_not_found")
    return entry


def text_backend_for(request: Request, model_id: str, endpoint: str) -> GenerationBackend:
    """The backend generating for `model_id` on `endpoint` (chat.completions / completions)."""
    registry = registry_of(request)
    spec, backend = model = _entry_or_404(registry, model_id)
    if spec.type not in TEXT_TYPES or not model.serves(endpoint):
        raise APIError(400, f"The model '{model_id}' is a {spec.type} model and cannot serve "
                            f"text generation; it serves {what_it_serves(spec.type)}.",
                       param="model", code="model_not_supported")
    refusal = getattr(backend, "unavailable", None)  # a stopped dedicated endpoint says why,
    error = refusal() if refusal is not None else None  # before its prompt is even built
    if error is not None:
        raise error
    return backend


# What a model of each type is for: errors that send a model to the wrong endpoint say it.
SERVES_BY_TYPE = {
    "chat": "chat and text completions (POST /v1/chat/completions, /v1/completions)",
    "language": "text completions (POST /v1/completions)",
    "code": "text completions (POST /v1/completions)",
    "embedding": "embeddings (POST /v1/embeddings) and rerank (POST /v1/rerank)",
    "rerank": "rerank (POST /v1/rerank) and embeddings (POST /v1/embeddings)",
    "moderation": "content classification (POST /v1/moderations)",
    "audio": "speech synthesis (POST /v1/audio/speech)",
    "transcribe": "transcription (POST /v1/audio/transcriptions)",
    "image": "image generation (POST /v1/images/generations)",
    "video": "video generation (POST /v2/videos)",
}


def what_it_serves(model_type: str) -> str:
    return SERVES_BY_TYPE.get(model_type, f"{model_type} requests")


def embedding_backend_for(request: Request, model_id: str, endpoint: str, action: str):
    """The EmbeddingBackend serving `model_id` on `endpoint` (embeddings / rerank); 404 for an
    unknown model, 400 naming what the model does and which models can `action`."""
    registry = registry_of(request)
    capable = [s for s, _ in registry.serving(endpoint)]
    spec, backend = model = _entry_or_404(registry, model_id)
    if not model.serves(endpoint):
        if capable:
            alternatives = "Models that can: " + ", ".join(
                f"{s.id} ({s.type})" for s in capable) + "."
        else:
            alternatives = ("This server serves no embedding model (start it with "
                            "`k2serve serve --families ...,embedding`).")
        raise APIError(400, f"The model '{model_id}' is a {spec.type} model and cannot "
                            f"{action}; it serves {what_it_serves(spec.type)}. {alternatives}",
                       param="model", code="model_not_supported")
    return backend


# An image / video model's endpoint -> (its model type, what it does, the serve flag)
DIFFUSION_ENDPOINTS = {
    "images": ("image", "generate images", "--image-model DIR"),
    "videos": ("video", "generate videos", "--video-model DIR"),
}


def diffusion_backend_for(request: Request, model_id, endpoint: str):
    """(model id, DiffusionBackend) of an image or video request's `model`: 400 for a missing
    one, 404 for an unknown one, 400 for a model of another type; with no such model
    configured, each says which `k2serve serve` flag serves one."""
    registry = registry_of(request)
    needed, action, flag = DIFFUSION_ENDPOINTS[endpoint]
    capable = [s.id for s, _ in registry.serving(endpoint)]
    hint = (f"Models that can: {', '.join(capable)}." if capable else
            f"This server has no {needed} model configured: start it with `k2serve serve "
            f"{flag}` (a diffusers pipeline directory).")
    if model_id is None or model_id == "":
        raise APIError(400, f"Missing required parameter: 'model'. {hint}", param="model")
    if not isinstance(model_id, str):
        raise APIError(400, "'model' must be a string.", param="model")
    entry = registry.get(model_id)
    if entry is None:
        raise APIError(404, f"The model '{model_id[:256]}' does not exist or is not served "
                            f"here. {hint}", param="model", code="model_not_found")
    if not entry.serves(endpoint):
        raise APIError(400, f"The model '{model_id}' is a {entry.spec.type} model and cannot "
                            f"{action}; it serves {what_it_serves(entry.spec.type)}. {hint}",
                       param="model", code="model_not_supported")
    return model_id, entry.backend
