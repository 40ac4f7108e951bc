"""The API surfaces that generate text, and what each request reserves.

Chat completions, Anthropic Messages and OpenAI Responses all run a chat generation
(k2serve.api.chat_run): each surface's body becomes a ChatCompletionRequest by its
translator. The platform's admission asks `usage_bound` for the tokens a request may use
(its prompt as the route builds it, plus n x the most it may generate), whatever the surface.
"""

from __future__ import annotations

from collections.abc import Callable

from k2serve.api.anthropic_messages import messages_to_chat
from k2serve.api.prompts import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    chat_max_tokens_param,
    chat_prompt,
    completion_prompt_ids,
    fit_context,
)
from k2serve.api.request_scope import RequestScope
from k2serve.api.responses_request import responses_to_chat
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.schemas.completions import CompletionRequest
from k2serve.api.tools import plan_tools
from k2serve.serving.backend import GenerationBackend
from k2serve.text.reasoning import ReasoningFormat

# ledger endpoint name -> its body (for a model that reasons so, or None) as a chat request
# (raises APIError/ValueError when invalid)
CHAT_SURFACES: dict[str, Callable[[dict, ReasoningFormat | None], ChatCompletionRequest]] = {
    "chat.completions": lambda body, reasoning: ChatCompletionRequest.model_validate(body),
    "messages": messages_to_chat,
    "responses": responses_to_chat,
}
GENERATING_ENDPOINTS = frozenset(CHAT_SURFACES) | {"completions"}


def served_endpoint(endpoint: str) -> str:
    """The backend endpoint a surface needs: every chat surface runs on chat.completions."""
    return "chat.completions" if endpoint in CHAT_SURFACES else endpoint


def usage_bound(endpoint: str, backend: GenerationBackend, body: dict,
                scope: RequestScope | None = None) -> tuple[int, int]:
    """(prompt tokens, n x the most the request may generate) of a generating request,
    for rate limits and budgets: the prompt the route will build, with the model's own
    tokenizer and chat template, fitted to the context as the route fits it. Raises APIError /
    ValueError for a body the route refuses anyway. The encoded prompt is kept on `scope`,
    for the route to reuse."""
    if endpoint == "completions":
        req = CompletionRequest.model_validate(body)
        ids = completion_prompt_ids(req, backend, scope)
        default, param = COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens"
    else:
        req = CHAT_SURFACES[endpoint](body, backend.reasoning)
        ids = chat_prompt(req, backend, plan_tools(req, backend), scope)[1]
        default, param = None, chat_max_tokens_param(req)
    if len(ids) >= backend.context_length and req.context_length_exceeded_behavior != "truncate":
        return len(ids), 0  # the route refuses it: it holds its prompt until then
    # What the route runs: the prompt and max_tokens fitted to the context ("error" requests
    # that fit come out the same; one whose max_tokens is too large is refused, so it holds
    # at most what is left).
    fitted = fit_context(ids, req.requested_max_tokens, default, backend.context_length,
                         "truncate", param)
    return len(fitted.ids), req.n * fitted.max_tokens
