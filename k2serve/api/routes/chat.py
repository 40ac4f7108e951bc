"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES, STREAM_OR_JSON
from k2serve.api.generation import (
    RequestCapacity,
    collect,
    compile_grammar,
    merged_choices,
    openai_chat_logprobs,
    request_capacity,
    sse_stream,
    stream_deltas,
    together_logprobs,
    until_disconnected,
    usage_dict,
)
from k2serve.api.models_lookup import text_backend_for
from k2serve.api.prefix_cache import cache_salt
from k2serve.api.prompts import chat_max_tokens_param, chat_prompt, fit_context
from k2serve.api.response_format import response_format_grammar
from k2serve.api.safety_guard import chat_input_texts, safety_guard
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.tools import (
    StreamingToolState,
    ToolPlan,
    finish_with_tools,
    parse_message,
    plan_tools,
)
from k2serve.api.usage import UsageTracker
from k2serve.errors import bad_request
from k2serve.serving.backend import GenerationBackend
from k2serve.structured import GrammarError

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions", responses=STREAM_OR_JSON)
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           capacity: RequestCapacity = Depends(request_capacity)):
    backend = text_backend_for(request, req.model, "chat.completions")
    guard = safety_guard(request, req.safety_model)  # 400 for a safety model not served
    # Off the event loop: checking large tool schemas, rendering and tokenizing a long
    # prompt take seconds that every other request would wait for.
    plan = await run_in_threadpool(plan_tools, req, backend)
    grammar, stop = await _grammar(req, backend, plan)
    if req.max_completion_tokens == 0 or req.max_tokens == 0:
        raise bad_request("max_tokens must be at least 1 for chat completions.", param="max_tokens")

    prompt_text, prompt_ids = await run_in_threadpool(chat_prompt, req, backend, plan)
    prepared = fit_context(prompt_ids, req.requested_max_tokens, None, backend.context_length,
                           req.context_length_exceeded_behavior, chat_max_tokens_param(req))
    if stop is not None and req.stop_list:
        prepared.warnings.append("stop sequences are not applied to structured output: the "
                                 "grammar decides where it ends.")
    reservation = capacity.reserve(backend, req.n)  # released when the exchange ends
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    tracker = UsageTracker(request, req.model, "chat.completions", len(prepared.ids), req.n)
    choices = merged_choices(backend, prepared.ids, req, prepared.max_tokens, tracker,
                             grammar=grammar, stop=stop, reservation=reservation,
                             cache_salt=cache_salt(request, req))
    if guard is not None:  # input checked first, output released in checked pieces
        choices = guard.guarded(request, choices, chat_input_texts(req.messages), req.n,
                                len(prepared.ids), tracker)
    capacity.owns(choices)
    prompt_field = [{"text": prompt_text}] if req.echo else []

    def logprobs_of(entries):
        if not entries:
            return None
        return openai_chat_logprobs(entries) if req.openai_logprobs else together_logprobs(entries)

    if req.stream:
        return StreamingResponse(
            sse_stream(_stream(req, reply_id, created, choices, prepared, prompt_field,
                               logprobs_of, plan)),
            media_type="text/event-stream", headers={"cache-control": "no-cache"})

    results = await until_disconnected(request, collect(choices, req.n))
    completion_tokens = sum(r.completion_tokens for r in results)
    body = {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "prompt": prompt_field,
        "choices": [_choice(i, r, req, plan, logprobs_of) for i, r in enumerate(results)],
        "usage": usage_dict(len(prepared.ids), completion_tokens, results[0].cached_tokens),
    }
    if guard is not None:
        body["safety"] = guard.report()
    if prepared.warnings:
        body["warnings"] = [{"message": w} for w in prepared.warnings]
    return JSONResponse(body)


async def _grammar(req: ChatCompletionRequest, backend: GenerationBackend, plan: ToolPlan | None):
    """(compiled grammar or None, stop strings override): response_format or tool calls.

    Stop strings would cut structured output short of valid, so they apply only to free text.
    """
    try:
        fmt = await run_in_threadpool(response_format_grammar, req.response_format)
    except GrammarError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    if fmt is not None and plan is not None:
        raise bad_request("response_format cannot be combined with tool calls; set tool_choice "
                          "to 'none', or leave out response_format.", param="response_format")
    if fmt is not None:
        text, what = fmt
        param = what if what.startswith("response_format") else "response_format"
        return await compile_grammar(backend, text, what, param), []
    if plan is not None:
        grammar = await compile_grammar(backend, plan.grammar, "The tools' parameters",
                                        "tools")
        return grammar, ([] if plan.whole_reply else None)
    return None, None


def _choice(index: int, result, req: ChatCompletionRequest, plan: ToolPlan | None,
            logprobs_of) -> dict:
    message, finish = {"role": "assistant", "content": result.text}, result.finish_reason
    if plan is not None:
        message, has_calls = parse_message(result.text, plan)
        finish = finish_with_tools(finish, has_calls)
    choice = {"index": index, "message": message, "finish_reason": finish,
              "logprobs": logprobs_of(result.logprobs)}
    if req.seed is not None:
        choice["seed"] = req.seed + index
    return choice


async def _stream(req, reply_id, created, choices, prepared, prompt_field, logprobs_of,
                  plan: ToolPlan | None):
    """Together-style chunks: role on every delta; the last chunk carries usage."""
    tools = StreamingToolState(req.n, plan) if plan is not None else None

    def chunk(index, delta, finish_reason=None, usage=None, logprobs=None):
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                "model": req.model,
                "choices": [{"index": index, "delta": {"role": "assistant", **delta},
                             "finish_reason": finish_reason, "logprobs": logprobs}],
                "usage": usage}
        if usage and prepared.warnings:
            body["warnings"] = [{"message": w} for w in prepared.warnings]
        return body

    first = True
    async for index, delta, usage in stream_deltas(choices, req.n, len(prepared.ids)):
        logprobs = logprobs_of(delta.logprobs)
        if tools is None:
            piece = {"content": delta.text}
            if delta.token_ids:
                piece["token_id"] = delta.token_ids[-1]
            out = chunk(index, piece, delta.finish_reason, usage, logprobs)
            if prompt_field and first:
                out["prompt"] = prompt_field
            first = False
            yield out
            continue
        pieces = tools.deltas(index, delta.text, finished=bool(delta.finish_reason))
        if delta.finish_reason:
            for piece in pieces:
                yield chunk(index, piece)
            finish = finish_with_tools(delta.finish_reason, tools.has_tool_calls(index))
            yield chunk(index, {"content": ""}, finish, usage, logprobs)
        else:
            if not pieces and logprobs:
                pieces = [{"content": ""}]  # tokens held back by the parser still report logprobs
            for i, piece in enumerate(pieces):
                yield chunk(index, piece, logprobs=logprobs if i == 0 else None)
