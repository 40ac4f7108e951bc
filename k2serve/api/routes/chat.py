"""POST /v1/chat/completions: OpenAI/Together's shapes over a ChatRun.

A reasoning model's thinking comes as `reasoning_content` (DeepSeek's and Moonshot's name) and
`reasoning` (vLLM's current one), in the message and as stream deltas of their own.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from k2serve.api.chat_run import ChatRun, start_chat
from k2serve.api.errors import ERROR_RESPONSES, STREAM_OR_JSON
from k2serve.api.generation import (
    RequestCapacity,
    openai_chat_logprobs,
    request_capacity,
    sse_stream,
    together_logprobs,
)
from k2serve.api.schemas.chat import ChatCompletionRequest

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions", responses=STREAM_OR_JSON)
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           capacity: RequestCapacity = Depends(request_capacity)):
    run = await start_chat(req, request, capacity)
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    prompt_field = [{"text": run.prompt_text}] if req.echo else []

    def logprobs_of(entries):
        if not entries:
            return None
        return openai_chat_logprobs(entries) if req.openai_logprobs else together_logprobs(entries)

    if req.stream:
        return StreamingResponse(
            sse_stream(_stream(run, reply_id, created, prompt_field, logprobs_of)),
            media_type="text/event-stream", headers={"cache-control": "no-cache"})

    results = await run.results(request)
    choices = []
    for index, result in enumerate(results):
        message, finish = run.message(result)
        choice = {"index": index, "message": _with_reasoning_alias(message),
                  "finish_reason": finish,
                  "logprobs": logprobs_of(result.logprobs)}
        if req.seed is not None:
            choice["seed"] = req.seed + index
        choices.append(choice)
    body = {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "prompt": prompt_field,
        "choices": choices,
        "usage": run.usage(results),
    }
    if run.guard is not None:
        body["safety"] = run.guard.report()
    if run.prepared.warnings:
        body["warnings"] = [{"message": w} for w in run.prepared.warnings]
    return JSONResponse(body)


async def _stream(run: ChatRun, reply_id: str, created: int, prompt_field: list, logprobs_of):
    """Together-style chunks: role on every delta; the last chunk carries usage."""
    first = True
    async for piece in run.pieces():
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                "model": run.req.model,
                "choices": [{"index": piece.index,
                             "delta": {"role": "assistant", **_with_reasoning_alias(piece.delta)},
                             "finish_reason": piece.finish_reason,
                             "logprobs": logprobs_of(piece.logprobs)}],
                "usage": piece.usage}
        if piece.usage and run.prepared.warnings:
            body["warnings"] = [{"message": w} for w in run.prepared.warnings]
        if prompt_field and first:
            body["prompt"] = prompt_field
        first = False
        yield body


def _with_reasoning_alias(message: dict) -> dict:
    if "reasoning_content" not in message:
        return message
    return {**message, "reasoning": message["reasoning_content"]}
