"""POST /v1/moderations (OpenAI's shape), backed by the served moderation model.

Each result carries OpenAI's categories (mapped from the model's labels as in
k2serve.safety.labels; categories the model does not assess are 0.0 / false and have no
applied input type) plus the model's own six labels in `label_scores` / `flagged_labels`.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.safety_guard import moderation_backend, moderation_models
from k2serve.api.schemas.moderations import ModerationRequest
from k2serve.api.usage import UsageTracker
from k2serve.errors import bad_request, too_deep
from k2serve.safety.labels import (
    LABELS,
    THRESHOLD,
    assessed,
    flagged_labels,
    openai_scores,
)

router = APIRouter(responses=ERROR_RESPONSES)

MAX_INPUTS = 32  # texts per request
MAX_INPUT_CHARS = 32_768  # characters per text (a long text is scored in 100-word windows)


def _texts(value: Any) -> list[str]:
    """`input`: a string, a list of strings, or a list of OpenAI's `{type: "text"}` parts."""
    if value is None:
        raise bad_request("Missing required parameter: 'input'.", param="input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad_request("'input' must be a string or a list of strings.", param="input")
    if not items:
        raise bad_request("'input' must not be empty.", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(items)} items; at most {MAX_INPUTS} are allowed "
                          f"per request.", param="input")
    texts = []
    for i, item in enumerate(items):
        where = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(item, dict) and item.get("type") == "text":
            item = item.get("text")
        elif isinstance(item, dict) and item.get("type") == "image_url":
            raise bad_request(f"{where} is an image; the moderation models here classify "
                              f"text only.", param="input", code="unsupported_content_type")
        if not isinstance(item, str):
            raise bad_request(f"{where} must be a string (got {type(item).__name__}).",
                              param="input")
        if not item:
            raise bad_request(f"{where} must not be an empty string.", param="input")
        if len(item) > MAX_INPUT_CHARS:
            raise bad_request(f"{where} has {len(item)} characters; at most {MAX_INPUT_CHARS} "
                              f"are allowed.", param="input")
        texts.append(item)
    return texts


def _model_id(request: Request, body: dict) -> str:
    model = body.get("model")
    if model is None:  # OpenAI's SDK sends none unless asked: the first served model
        served = moderation_models(request)
        if not served:
            raise bad_request("This server serves no moderation model (start it with "
                              "--families moderation).", param="model",
                              code="model_not_found")
        return served[0]
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a model id string.", param="model")
    return model


def _result(scores: dict[str, float]) -> dict:
    categories = openai_scores(scores)
    labels = flagged_labels(scores)
    return {
        "flagged": bool(labels),
        "categories": {c: s >= THRESHOLD for c, s in categories.items()},
        "category_scores": categories,
        "category_applied_input_types": {c: ["text"] if assessed(c) else []
                                         for c in categories},
        "label_scores": {label: scores[label] for label in LABELS},
        "flagged_labels": labels,
    }


@router.post("/v1/moderations", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ModerationRequest.model_json_schema()}}}})
async def moderations(request: Request):
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("Request body is not valid JSON.") from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model_id = _model_id(request, body)
    backend = moderation_backend(request, model_id, "model")
    texts = _texts(body.get("input"))
    scored = await backend.classify(texts)
    words = sum(s.words for s in scored)
    tracker = UsageTracker(request, model_id, "moderations", words, 1)
    tracker.finish("ok")
    return JSONResponse({
        "id": f"modr-{uuid.uuid4().hex}",
        "model": model_id,
        "results": [_result(s.scores) for s in scored],
        "usage": {"prompt_tokens": words, "completion_tokens": 0, "total_tokens": words},
    })
