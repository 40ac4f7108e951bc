"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, so Claude Code
and the `anthropic` SDKs drive the models served here (k2serve.api.anthropic_messages)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.anthropic_messages import (
    content_blocks,
    message_id,
    stop_reason,
    stream_events,
    to_chat,
    usage,
)
from k2serve.api.chat_run import start_chat
from k2serve.api.errors import (
    ANTHROPIC_ERROR_RESPONSES,
    STREAM_OR_JSON,
    anthropic_error_body,
)
from k2serve.api.generation import RequestCapacity, request_capacity
from k2serve.api.models_lookup import registry_of, text_backend_for
from k2serve.api.prompts import chat_prompt
from k2serve.api.schemas.messages import CountTokensRequest, MessagesRequest
from k2serve.api.tools import plan_tools
from k2serve.api.wire_json import json_line
from k2serve.errors import APIError
from k2serve.serving.backend import GenerationBackend
from k2serve.serving.catalog import K2_ANTHROPIC_TEMPERATURE_SCALE

router = APIRouter(responses=ANTHROPIC_ERROR_RESPONSES)

def temperature_scale(request: Request, model_id: str, backend: GenerationBackend) -> float:
    """The model's own scale, else K2's for a model that speaks K2's tool format."""
    scale = registry_of(request).get(model_id).spec.anthropic_temperature_scale
    if scale is not None:
        return scale
    return K2_ANTHROPIC_TEMPERATURE_SCALE if backend.tool_format == "kimi_k2" else 1.0


@router.post("/v1/messages", responses=STREAM_OR_JSON)
async def messages(req: MessagesRequest, request: Request,
                   capacity: RequestCapacity = Depends(request_capacity)):
    backend = text_backend_for(request, req.model, "chat.completions")  # 404 / 400 first
    chat = to_chat(req, temperature_scale(request, req.model, backend), backend.reasoning)
    run = await start_chat(chat, request, capacity, endpoint="messages", max_tokens_is_a_cap=True)
    reply = {"id": message_id(), "type": "message", "role": "assistant", "model": req.model}
    if req.stream:
        start = {**reply, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": usage(run.prompt_tokens, 0, 0)}
        events = stream_events(run.pieces(), start, run.prompt_tokens)
        return StreamingResponse(_sse(events), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    result = (await run.results(request))[0]
    message, finish = run.message(result)
    return JSONResponse({
        **reply,
        "content": content_blocks(message),
        "stop_reason": stop_reason(finish, result.stop_sequence),
        "stop_sequence": result.stop_sequence,
        "usage": usage(run.prompt_tokens, result.completion_tokens, result.cached_tokens),
    })


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request):
    """The prompt's tokens as /v1/messages would build it (tools and system included)."""
    backend = text_backend_for(request, req.model, "chat.completions")
    chat = to_chat(req, reasoning=backend.reasoning)

    def count() -> int:
        return len(chat_prompt(chat, backend, plan_tools(chat, backend))[1])

    return {"input_tokens": await run_in_threadpool(count)}


async def _sse(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
    """Anthropic's framing: `event: NAME` and its `data:`; a failure is an `error` event."""
    try:
        async for name, data in events:
            yield _event(name, data)
    except APIError as exc:
        yield _event("error", anthropic_error_body(exc))
    except Exception as exc:
        yield _event("error", anthropic_error_body(APIError(500, str(exc))))


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json_line(data)}\n\n"
