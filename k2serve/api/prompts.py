"""The prompt builder: a chat or completions request -> its prompt text -> token ids -> fitted
to the model's context. The routes build their prompts here, and the platform's admission
reserves the same prompt's tokens (k2serve.api.surfaces.usage_bound), so a TPM reservation is
what the request really uses.

It works on the API's request models and raises the API's 400s, over any GenerationBackend
(k2serve.serving.backend): our engine or one put behind k2serve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from k2serve.api.chat_images import VISION_FLAG_HINT
from k2serve.api.request_scope import RequestScope
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.schemas.completions import CompletionRequest
from k2serve.api.tools import ToolPlan, prepare_messages
from k2serve.errors import APIError, bad_request
from k2serve.serving.backend import GenerationBackend
from k2serve.text.chat_template import (
    TemplateError,
    UnsupportedContentError,
    flatten_text_parts,
    normalize_messages,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class PreparedPrompt:
    ids: list[int]
    max_tokens: int
    warnings: list[str] = field(default_factory=list)


def message_dicts(req: ChatCompletionRequest, vision: bool = False) -> list[dict]:
    """Messages as the chat template expects them: text content, `developer` -> `system`.
    `vision`: a vision model's, where a content list with images stays a list of template
    parts ({"type": "text", "text"} / {"type": "image"})."""
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(f"messages[{i}] ({m.role}) must have content.",
                              param=f"messages.{i}.content")
    try:
        messages = normalize_messages(req.messages, flatten_content=not vision)
        if vision:
            for i, message in enumerate(messages):
                if isinstance(message.get("content"), list):
                    message["content"] = template_parts(message["content"], i)
    except UnsupportedContentError as exc:
        kind = exc.part_type
        where = f"messages[{exc.message_index}]"
        if kind == "image_url" and not vision:
            message = (f"Model '{req.model}' accepts text only; {where} contains an 'image_url' "
                       f"part. Send images to a vision model (its /v1/models entry says "
                       f"\"vision\": true); {VISION_FLAG_HINT}.")
        else:
            message = (f"Model '{req.model}' accepts {'text and images' if vision else 'text'} "
                       f"only; {where} contains a '{kind}' part. Send text content, or use a "
                       f"model that accepts that input.")
        raise bad_request(message, param=f"messages.{exc.message_index}.content",
                          code="unsupported_content_type") from exc
    for message in messages:
        message.setdefault("content", "")
    return messages


def template_parts(parts: list, message_index: int) -> str | list[dict]:
    """A content list for a vision model's template: text parts joined as before when there
    is no image, else {"type": "text"} / {"type": "image"} parts in order."""
    if not any(isinstance(p, dict) and p.get("type") == "image_url" for p in parts):
        return flatten_text_parts(parts, message_index)
    out = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "image_url":
            out.append({"type": "image"})
        else:
            out.append({"type": "text", "text": flatten_text_parts([part], message_index)})
    return out


def _as_parts(messages: list[dict]) -> list[dict]:
    """Every content as a parts list (what vision templates iterate), as transformers'
    processors hand them string content."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": [{"type": "text", "text": content}]}
        out.append(message)
    return out


def render_chat(req: ChatCompletionRequest, backend: GenerationBackend,
                plan: ToolPlan | None) -> str:
    """The chat prompt's text: the messages (tools declared as the plan says) through the
    model's chat template."""
    vision = getattr(backend, "vision", None) is not None
    messages = prepare_messages(message_dicts(req, vision), backend, req.tools,
                                declare=plan is not None)
    if vision:
        messages = _as_parts(messages)
    try:
        return backend.render_chat(messages, tools=req.tools or None,
                                   **(req.chat_template_kwargs or {}))
    except TemplateError as exc:
        raise bad_request(f"The messages could not be formatted with this model's chat "
                          f"template: {exc}", param="messages") from exc


def chat_prompt(req: ChatCompletionRequest, backend: GenerationBackend,
                plan: ToolPlan | None, scope: RequestScope | None = None,
                images: list | None = None) -> tuple[str, list[int]]:
    """(prompt text, token ids). Seconds for a long prompt: callers run it off the loop.
    With the request's scope, a text encoded before for the same request is not again.
    A vision model's prompt expands each image for `images` (its prepared images, in order;
    None: each at its largest, a bound for rate limits before the images are fetched)."""
    text = render_chat(req, backend, plan)
    vision = getattr(backend, "vision", None)
    if vision is not None:
        try:
            text = vision.expand(text, images)
        except ValueError as exc:
            raise bad_request(f"The messages' images could not be placed: {exc}.",
                              param="messages") from None
        return text, backend.encode_chat_prompt(text)
    return text, _encode_once(scope, "chat", text, backend.encode_chat_prompt)


def _encode_once(scope: RequestScope | None, kind: str, text: str,
                 encode: Callable[[str], list[int]]) -> list[int]:
    memo = scope.encoded_prompt if scope is not None else None
    if memo is not None and memo[0] == (kind, text):
        return list(memo[1])
    ids = encode(text)
    if scope is not None:
        scope.encoded_prompt = ((kind, text), list(ids))
    return ids


def chat_max_tokens_param(req: ChatCompletionRequest) -> str:
    return "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"


def completion_prompt_ids(req: CompletionRequest, backend: GenerationBackend,
                          scope: RequestScope | None = None) -> list[int]:
    """A completions prompt's token ids: its text encoded as plain text, or the ids it
    gives, each checked against the vocabulary. Seconds for a long prompt: run it off the loop."""
    if isinstance(req.prompt, str):
        return _encode_once(scope, "text", req.prompt, backend.encode_text_prompt)
    vocab = backend.tokenizer.vocab_size
    for i, token in enumerate(req.prompt):
        if token >= vocab:
            raise bad_request(f"prompt[{i}] is token id {token}, outside this model's vocabulary "
                              f"of {vocab} tokens.", param="prompt")
    return list(req.prompt)


def completion_prompt_text(req: CompletionRequest, backend: GenerationBackend) -> str:
    """The prompt as text (echo, the safety model): token ids decoded, control tokens kept."""
    if isinstance(req.prompt, str):
        return req.prompt
    return backend.tokenizer.decode(req.prompt, skip_special_tokens=False)


def fit_context(prompt_ids: list[int], requested: int | None, default: int | None,
                context_length: int, behavior: str, param: str) -> PreparedPrompt:
    """Check prompt + max_tokens against the context; `truncate` shrinks instead of failing."""
    warnings: list[str] = []
    if len(prompt_ids) >= context_length:
        if behavior != "truncate":
            raise APIError(400, f"The prompt is {len(prompt_ids)} tokens long, which exceeds this "
                                f"model's context length of {context_length} tokens.",
                           param="messages" if param == "max_completion_tokens" else "prompt",
                           code="context_length_exceeded")
        keep = context_length - 1
        warnings.append(f"The prompt was truncated from {len(prompt_ids)} to its last {keep} "
                        f"tokens to fit the context length of {context_length}.")
        prompt_ids = prompt_ids[-keep:]
    room = context_length - len(prompt_ids)
    if requested is None:
        max_tokens = room if default is None else min(default, room)
    elif requested > room:
        if behavior != "truncate":
            raise APIError(400, f"This model's context length is {context_length} tokens; the prompt "
                                f"uses {len(prompt_ids)} and {param}={requested} asks for more than "
                                f"the {room} left. Lower {param}, or set "
                                f"context_length_exceeded_behavior to 'truncate'.",
                           param=param, code="context_length_exceeded")
        warnings.append(f"{param} was lowered from {requested} to {room} to fit the context length.")
        max_tokens = room
    else:
        max_tokens = requested
    return PreparedPrompt(prompt_ids, max_tokens, warnings)
