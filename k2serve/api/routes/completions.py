"""POST /v1/completions (legacy text completion)."""

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
    request_capacity,
    sse_stream,
    stream_deltas,
    together_logprobs,
    until_disconnected,
    usage_dict,
)
from k2serve.api.models_lookup import text_backend_for
from k2serve.api.prefix_cache import cache_salt
from k2serve.api.prompts import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    completion_prompt_ids,
    completion_prompt_text,
    fit_context,
)
from k2serve.api.request_scope import request_scope
from k2serve.api.response_format import structured_outputs_grammar
from k2serve.api.safety_guard import safety_guard
from k2serve.api.schemas.completions import CompletionRequest
from k2serve.api.usage import UsageTracker
from k2serve.errors import bad_request
from k2serve.structured import GrammarError

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/completions", responses=STREAM_OR_JSON)
async def completions(req: CompletionRequest, request: Request,
                      capacity: RequestCapacity = Depends(request_capacity)):
    backend = text_backend_for(request, req.model, "completions")
    guard = safety_guard(request, req.safety_model)  # 400 for a safety model not served
    # A 4 MB prompt tokenizes for seconds: off the event loop, which serves everyone.
    prompt_ids = await run_in_threadpool(completion_prompt_ids, req, backend,
                                         request_scope(request))
    prompt_text = req.prompt if isinstance(req.prompt, str) else \
        await run_in_threadpool(completion_prompt_text, req, backend)
    prepared = fit_context(prompt_ids, req.max_tokens,
                           COMPLETIONS_DEFAULT_MAX_TOKENS, backend.context_length,
                           req.context_length_exceeded_behavior, "max_tokens")
    reply_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo_text = prompt_text if req.echo else ""
    prompt_field: list[dict] = []
    if req.echo:
        prompt_field = [{"text": prompt_text}]

    grammar = None
    if req.structured_outputs is not None:
        try:
            text, what, param = await run_in_threadpool(structured_outputs_grammar,
                                                        req.structured_outputs)
        except GrammarError as exc:
            raise bad_request(str(exc), param=exc.param) from None
        grammar = await compile_grammar(backend, text, what, param)
    if prepared.max_tokens == 0 and req.num_top_logprobs is None:
        choices = None  # nothing to compute
    else:
        reservation = capacity.reserve(backend, req.n)  # released when the exchange ends
        tracker = UsageTracker(request, req.model, "completions", len(prepared.ids), req.n)
        choices = merged_choices(backend, prepared.ids, req, prepared.max_tokens, tracker,
                                 grammar=grammar, stop=[] if grammar is not None else None,
                                 reservation=reservation, cache_salt=cache_salt(request, req))
        if guard is not None:  # prompt checked first, output released in checked pieces
            choices = guard.guarded(request, choices, [prompt_text], req.n, len(prepared.ids),
                                    tracker)
        capacity.owns(choices)

    if req.stream:
        return StreamingResponse(sse_stream(_stream(req, reply_id, created, choices, prepared,
                                                    echo_text)),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    results = [None] * req.n
    if choices is not None:
        results = await until_disconnected(request, collect(choices, req.n))
    prompt_logprobs = (results[0].prompt_logprobs if results[0] else None) or []
    if prompt_logprobs and prompt_field:
        prompt_field[0]["logprobs"] = together_logprobs(prompt_logprobs)

    body_choices = []
    for i, r in enumerate(results):
        text = echo_text + (r.text if r else "")
        logprobs = None
        if req.num_top_logprobs is not None and r is not None:
            entries = (prompt_logprobs if req.echo else []) + r.logprobs
            logprobs = together_logprobs(entries)
        # Together's schema types logprobs as an object, not null: present only when asked
        body_choices.append({"index": i, "text": text,
                             "finish_reason": r.finish_reason if r else "length",
                             **_stop_reason(r.stop_sequence if r else None),
                             **({"logprobs": logprobs} if logprobs is not None else {}),
                             **({"seed": req.seed + i} if req.seed is not None else {})})
    body = {"id": reply_id, "object": "text.completion", "created": created, "model": req.model,
            "prompt": prompt_field, "choices": body_choices,
            "usage": usage_dict(len(prepared.ids), sum(r.completion_tokens for r in results if r),
                                 results[0].cached_tokens if results[0] else 0)}
    if guard is not None:
        body["safety"] = guard.report()
    if prepared.warnings:
        body["warnings"] = [{"message": w} for w in prepared.warnings]
    return JSONResponse(body)


async def _stream(req, reply_id, created, choices, prepared, echo_text):
    def chunk(index, text, finish_reason, usage, logprobs=None, token_id=None, stop=None):
        delta = {"content": text}
        if token_id is not None:
            delta["token_id"] = token_id
        return {"id": reply_id, "object": "completion.chunk", "created": created,
                "model": req.model,
                "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                             "logprobs": logprobs, "delta": delta, **_stop_reason(stop)}],
                "usage": usage}

    if echo_text:
        for i in range(req.n):
            yield chunk(i, echo_text, None, None)
    if choices is None:
        for i in range(req.n):
            last = i == req.n - 1
            yield chunk(i, "", "length", usage_dict(len(prepared.ids), 0) if last else None)
        return
    async for index, delta, usage in stream_deltas(choices, req.n, len(prepared.ids)):
        logprobs = together_logprobs(delta.logprobs) if delta.logprobs else None
        yield chunk(index, delta.text, delta.finish_reason, usage, logprobs,
                    delta.token_ids[-1] if delta.token_ids else None, delta.stop_sequence)


def _stop_reason(stop_sequence: str | None) -> dict:
    """vLLM's `stop_reason`: the stop string that ended the choice (a k2serve in front of this
    one reads it, e.g. for Anthropic's `stop_sequence`)."""
    return {"stop_reason": stop_sequence} if stop_sequence is not None else {}
