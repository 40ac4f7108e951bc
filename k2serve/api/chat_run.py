"""One chat generation, whatever API surface asked for it.

OpenAI/Together chat completions, Anthropic Messages and OpenAI Responses differ in their
request and reply shapes only: each translates its request into a ChatCompletionRequest,
starts a ChatRun here (tools planned, grammar compiled, prompt rendered and fitted, capacity
reserved, usage tracked under the surface's own ledger name, safety guard applied), and
formats what the run yields — finished choices, or streamed pieces in chat-delta form
(`{"reasoning_content": ...}`, `{"content": ...}` or `{"tool_calls": [...]}`) that each surface
maps onto its own events (k2serve.api.chat_output reads the output).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from k2serve.api.chat_images import prepare_chat_images
from k2serve.api.chat_output import (
    ChoiceOutput,
    OutputPlan,
    output_plan,
    reasoning_tokens,
    thinking_syntax,
)
from k2serve.api.generation import (
    ChoiceAccumulator,
    RequestCapacity,
    collect,
    compile_grammar,
    merged_choices,
    stream_deltas,
    until_disconnected,
    usage_dict,
)
from k2serve.api.models_lookup import text_backend_for
from k2serve.api.prefix_cache import cache_salt
from k2serve.api.prompts import (
    PreparedPrompt,
    chat_max_tokens_param,
    chat_prompt,
    fit_context,
)
from k2serve.api.request_scope import request_scope
from k2serve.api.response_format import response_format_grammar
from k2serve.api.safety_guard import SafetyGuard, chat_input_texts, safety_guard
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.tools import ToolPlan, finish_with_tools, plan_tools
from k2serve.api.usage import UsageTracker
from k2serve.errors import APIError, bad_request
from k2serve.serving.backend import GenerationBackend, LogprobEntry, TextDelta
from k2serve.structured import GrammarError
from k2serve.structured.grammars import ThinkingSyntax


@dataclass
class ChatRun:
    """A started chat generation: its choices run once iterated (or collected)."""

    req: ChatCompletionRequest
    backend: GenerationBackend
    plan: ToolPlan | None  # None: the reply is free text (no tools, or tool_choice "none")
    prompt_text: str
    prepared: PreparedPrompt
    choices: AsyncIterator[tuple[int, TextDelta]]
    guard: SafetyGuard | None
    output: OutputPlan | None = None  # how the output is read (reasoning, tool calls)

    def __post_init__(self):
        if self.output is None:
            self.output = OutputPlan(self.plan, None)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.ids)

    @property
    def reasons(self) -> bool:
        """Whether the model writes reasoning apart from its reply."""
        return self.output.reasoning is not None

    async def results(self, request: Request) -> list[ChoiceAccumulator]:
        """Every choice, finished (cancelled if the client goes away first)."""
        return await until_disconnected(request, collect(self.choices, self.req.n))

    def message(self, result: ChoiceAccumulator) -> tuple[dict, str | None]:
        """(the assistant's chat message, finish reason) of a finished choice: its reasoning
        as `reasoning_content` (a reasoning model's), tool calls parsed out of the text when
        the request declared tools."""
        message, has_calls, _ = self.output.message(result.text)
        return message, finish_with_tools(result.finish_reason, has_calls)

    def reasoning_tokens(self, result: ChoiceAccumulator) -> int | None:
        """The tokens a finished choice spent reasoning (None: the model does not reason)."""
        if not self.reasons:
            return None
        return reasoning_tokens(result.marks, self.output.message(result.text)[2])

    def usage(self, results: list[ChoiceAccumulator]) -> dict:
        """Chat usage of finished choices (reasoning tokens detailed for a reasoning model)."""
        counts = [self.reasoning_tokens(r) for r in results]
        return usage_dict(self.prompt_tokens, sum(r.completion_tokens for r in results),
                          results[0].cached_tokens, None if not self.reasons else sum(counts))

    async def pieces(self) -> AsyncIterator[StreamPiece]:
        """The reply as chat-delta pieces, in order, per choice; the last piece of a choice
        carries its finish reason, and the very last one the usage."""
        outputs = [ChoiceOutput(self.output) for _ in range(self.req.n)]
        plain = self.plan is None and not self.reasons
        async for index, delta, usage in stream_deltas(self.choices, self.req.n,
                                                       self.prompt_tokens):
            output = outputs[index]
            parsed = output.feed(delta.text, len(delta.token_ids))
            if plain:  # the text as it comes, with its last token's id
                piece = {"content": delta.text}
                if delta.token_ids:
                    piece["token_id"] = delta.token_ids[-1]
                yield StreamPiece(index, piece, delta.finish_reason, usage, delta.logprobs,
                                  delta.stop_sequence)
                continue
            if delta.finish_reason:
                for piece in parsed + output.finish():
                    yield StreamPiece(index, piece)
                finish = finish_with_tools(delta.finish_reason, output.has_tool_calls)
                if usage is not None and self.reasons:
                    usage = {**usage, "completion_tokens_details": {
                        "reasoning_tokens": sum(o.reasoning_tokens for o in outputs)}}
                yield StreamPiece(index, {"content": ""}, finish, usage, delta.logprobs,
                                  delta.stop_sequence)
                continue
            if not parsed and delta.logprobs:
                parsed = [{"content": ""}]  # tokens held back by the parser still report logprobs
            for i, piece in enumerate(parsed):
                yield StreamPiece(index, piece, logprobs=delta.logprobs if i == 0 else None)


@dataclass
class StreamPiece:
    index: int  # the choice
    # {"content": str}, {"reasoning_content": str} or {"tool_calls": [{index, id?, type?,
    # function}]}
    delta: dict
    finish_reason: str | None = None
    usage: dict | None = None
    logprobs: list[LogprobEntry] | None = None
    stop_sequence: str | None = None  # with a finish: the stop string that ended the choice


async def start_chat(req: ChatCompletionRequest, request: Request, capacity: RequestCapacity,
                     endpoint: str = "chat.completions", max_tokens_is_a_cap: bool = False
                     ) -> ChatRun:
    """Validate, render and admit `req`; `endpoint` is the ledger's name for the surface.
    `max_tokens_is_a_cap`: a max_tokens beyond what the context leaves is lowered to it, not
    refused (Anthropic's clients send their model's largest output, e.g. 32000).

    Every client error is raised here, before a streamed reply's 200."""
    backend = text_backend_for(request, req.model, "chat.completions")
    guard = safety_guard(request, req.safety_model)  # 400 for a safety model not served
    # Off the event loop: checking large tool schemas, rendering and tokenizing a long
    # prompt take seconds that every other request would wait for.
    plan = await run_in_threadpool(plan_tools, req, backend)
    if req.max_completion_tokens == 0 or req.max_tokens == 0:
        raise bad_request("max_tokens must be at least 1 for chat completions.", param="max_tokens")

    vision = getattr(backend, "vision", None)
    pictures = await prepare_chat_images(request, req, vision) if vision is not None else None
    prompt_text, prompt_ids = await run_in_threadpool(chat_prompt, req, backend, plan,
                                                      request_scope(request), pictures)
    try:
        images = vision.image_inputs(prompt_ids, pictures) if pictures else None
    except ValueError as exc:
        raise bad_request(f"The messages' images could not be placed: {exc}.",
                          param="messages") from None
    if images and len(prompt_ids) >= backend.context_length:
        # truncating would cut image tokens off their image: refused whatever the behavior
        raise APIError(400, f"The prompt is {len(prompt_ids)} tokens long with its images, which "
                            f"exceeds this model's context length of {backend.context_length} "
                            f"tokens.", param="messages", code="context_length_exceeded")
    # The prompt says whether the reply starts inside a thinking block, which the tool-call
    # grammar must then allow first.
    output = output_plan(backend, plan, prompt_text)
    grammar, stop = await _grammar(req, backend, plan, thinking_syntax(backend, output))
    requested = req.requested_max_tokens
    room = backend.context_length - len(prompt_ids)
    if max_tokens_is_a_cap and requested is not None and room > 0:
        requested = min(requested, room)
    prepared = fit_context(prompt_ids, requested, None, backend.context_length,
                           req.context_length_exceeded_behavior, chat_max_tokens_param(req))
    if stop is not None and req.stop_list:
        prepared.warnings.append("stop sequences are not applied to structured output: the "
                                 "grammar decides where it ends.")
    reservation = capacity.reserve(backend, req.n)  # released when the exchange ends
    tracker = UsageTracker(request, req.model, endpoint, len(prepared.ids), req.n)
    choices = merged_choices(backend, prepared.ids, req, prepared.max_tokens, tracker,
                             grammar=grammar, stop=stop, reservation=reservation,
                             cache_salt=cache_salt(request, req), images=images)
    if guard is not None:  # input checked first, output released in checked pieces
        choices = guard.guarded(request, choices, chat_input_texts(req.messages), req.n,
                                len(prepared.ids), tracker)
    capacity.owns(choices)
    return ChatRun(req, backend, plan, prompt_text, prepared, choices, guard, output)


async def _grammar(req: ChatCompletionRequest, backend: GenerationBackend, plan: ToolPlan | None,
                   thinking: ThinkingSyntax | None):
    """(compiled grammar or None, stop strings override): response_format or tool calls
    (after a reasoning model's thinking).

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
        grammar = await compile_grammar(backend, plan.grammar(thinking), "The tools' parameters",
                                        "tools")
        return grammar, ([] if plan.whole_reply else None)
    return None, None
