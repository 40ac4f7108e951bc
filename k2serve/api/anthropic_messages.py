"""Anthropic's Messages API over a chat run: its request as a chat request, a finished chat
message as its content blocks, and chat-delta pieces as its stream events.

Content blocks map onto chat messages: `tool_use` blocks are an assistant's tool calls,
`tool_result` blocks become `tool` messages (before the user text of the same turn, where
Anthropic puts them), `thinking` blocks become the assistant message's `reasoning_content`,
which a reasoning model's chat template keeps or drops by its own rules (`redacted_thinking`
is Anthropic's encrypted text: nothing to read). Every other block type is refused by name.

A reasoning model's thinking comes back as a `thinking` block before the reply, streamed as
`thinking_delta`s and closed by a `signature_delta` (an opaque digest: the SDKs expect one).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from k2serve.api.chat_run import StreamPiece
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.api.schemas.messages import CountTokensRequest, MessagesRequest
from k2serve.errors import bad_request
from k2serve.text.reasoning import ReasoningFormat

# Harmless keys a block may carry: prompt prefixes are cached without being asked.
_IGNORED_BLOCK_KEYS = {"cache_control", "citations"}
_BLOCK_KEYS = {
    "text": {"type", "text"},
    "image": {"type", "source"},
    "tool_use": {"type", "id", "name", "input"},
    "tool_result": {"type", "tool_use_id", "content", "is_error"},
    "thinking": {"type", "thinking", "signature"},
    "redacted_thinking": {"type", "data"},
}


def messages_to_chat(body: dict, reasoning: ReasoningFormat | None = None
                     ) -> ChatCompletionRequest:
    """A /v1/messages body as the chat request it runs (its token reservation: same prompt)."""
    return to_chat(MessagesRequest.model_validate(body), reasoning=reasoning)


def to_chat(req: CountTokensRequest, temperature_scale: float = 1.0,
            reasoning: ReasoningFormat | None = None) -> ChatCompletionRequest:
    """`reasoning`: how the model thinks (None: it does not)."""
    fields: dict[str, Any] = {"model": req.model,
                              "messages": _kept_thinking(_chat_messages(req), req)}
    if req.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description or "", "parameters": t.input_schema}}
            for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if choice.type == "tool" and not choice.name:
            raise bad_request("tool_choice {\"type\": \"tool\"} needs the tool's \"name\".",
                              param="tool_choice.name")
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type) or {"type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    thinking = req.thinking.type if req.thinking is not None else None
    # "adaptive": the model decides whether to think (one without reasoning never does).
    if thinking == "enabled" and reasoning is None:
        raise bad_request(f"thinking {{\"type\": \"enabled\"}}: the model '{req.model}' "
                          f"does not produce thinking blocks.", param="thinking.type")
    if thinking == "disabled" and reasoning is not None:
        if reasoning.switch is None:
            raise bad_request(f"thinking {{\"type\": \"disabled\"}}: the model "
                              f"'{req.model}' always thinks (its chat template has no switch "
                              f"to turn thinking off); leave out thinking, or set it to "
                              f"enabled or adaptive.", param="thinking.type")
        fields["chat_template_kwargs"] = {reasoning.switch: False}
    if req.output_config is not None and req.output_config.format is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": req.output_config.format.schema_}}
    if isinstance(req, MessagesRequest):
        # Anthropic's default temperature is 1; the model's scale maps it (K2: to 0.6).
        temperature = 1.0 if req.temperature is None else req.temperature
        fields.update(max_tokens=req.max_tokens, temperature=temperature * temperature_scale,
                      top_p=req.top_p, top_k=req.top_k, stop=req.stop_sequences,
                      stream=req.stream)
    return ChatCompletionRequest.model_validate(fields)


def _chat_messages(req: CountTokensRequest) -> list[dict]:
    out: list[dict] = []
    system = _system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        where = f"messages.{i}.content"
        blocks = ([{"type": "text", "text": message.content}]
                  if isinstance(message.content, str) else message.content)
        for j, block in enumerate(blocks):
            _check_block(block, f"{where}.{j}")
        if message.role == "system":
            for j, block in enumerate(blocks):
                if block["type"] != "text":
                    raise bad_request("A system message holds text blocks only.",
                                      param=f"{where}.{j}.type")
            out.append({"role": "system", "content": "".join(b["text"] for b in blocks)})
        elif message.role == "assistant":
            if i == len(req.messages) - 1:
                raise bad_request("The last message is the assistant's: prefilling the reply "
                                  "is not supported here. End with a user message.",
                                  param=f"messages.{i}.role")
            out.append(_assistant(blocks))
        else:
            out += _user(blocks, where)
    return out


def _system_text(system) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad_request("system blocks must be text blocks.", param=f"system.{j}.type")
        _check_block(block, f"system.{j}")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _check_block(block: Any, where: str) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    allowed = _BLOCK_KEYS.get(kind)
    if allowed is None:
        raise bad_request(f"Content blocks of type {kind!r} are not supported here; this server "
                          f"takes {', '.join(_BLOCK_KEYS)} blocks.", param=f"{where}.type")
    unknown = sorted(set(block) - allowed - _IGNORED_BLOCK_KEYS)
    if unknown:
        raise bad_request(f"A {kind} block cannot have {', '.join(unknown)} here.",
                          param=f"{where}.{unknown[0]}")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise bad_request("A text block needs a string 'text'.", param=f"{where}.text")
    if kind == "tool_use" and not (isinstance(block.get("name"), str)
                                   and isinstance(block.get("input"), dict)
                                   and isinstance(block.get("id"), str)):
        raise bad_request("A tool_use block needs 'id', 'name' and an object 'input'.",
                          param=where)
    if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
        raise bad_request("A tool_result block needs its 'tool_use_id'.",
                          param=f"{where}.tool_use_id")


def _kept_thinking(messages: list[dict], req: CountTokensRequest) -> list[dict]:
    """A clear_thinking context edit drops the thinking of all but the last `keep`
    assistant turns that have some (Anthropic's default: 1; {"keep": "all"} keeps all)."""
    edits = req.context_management.edits if req.context_management is not None else []
    keep: int | None = None
    for edit in edits:
        value = (edit.model_extra or {}).get("keep", {"type": "thinking_turns", "value": 1})
        if value == "all":
            continue
        count = value.get("value") if isinstance(value, dict) else None
        if not isinstance(count, int) or count < 0:
            raise bad_request("context_management: a clear_thinking edit's keep is \"all\" "
                              "or {\"type\": \"thinking_turns\", \"value\": N}.",
                              param="context_management.edits")
        keep = count if keep is None else min(keep, count)
    if keep is None:
        return messages
    thinking = [i for i, m in enumerate(messages) if m.get("reasoning_content")]
    cleared = set(thinking[:len(thinking) - keep]) if keep else set(thinking)
    return [{k: v for k, v in m.items() if k != "reasoning_content"} if i in cleared else m
            for i, m in enumerate(messages)]


def _assistant(blocks: list[dict]) -> dict:
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    thinking = "".join(b.get("thinking") or "" for b in blocks if b["type"] == "thinking")
    calls = [{"id": b["id"], "type": "function",
              "function": {"name": b["name"], "arguments": json.dumps(b["input"],
                                                                     ensure_ascii=False)}}
             for b in blocks if b["type"] == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    elif not text:
        message["content"] = ""
    if thinking:
        message["reasoning_content"] = thinking
    return message


def _user(blocks: list[dict], where: str) -> list[dict]:
    """A user turn: its tool results as tool messages, its text and images as a user message."""
    out: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(blocks):
        if block["type"] == "tool_result":
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": _tool_result_text(block, f"{where}.{j}")})
        elif block["type"] == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif block["type"] == "image":
            parts.append({"type": "image_url",
                          "image_url": {"url": _image_url(block.get("source"), f"{where}.{j}")}})
        else:
            raise bad_request(f"A user message cannot hold a {block['type']} block.",
                              param=f"{where}.{j}.type")
    if any(p["type"] == "image_url" for p in parts):  # the chat route fetches and checks them
        out.append({"role": "user", "content": parts})
    elif parts:
        out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
    return out


def _image_url(source: Any, where: str) -> str:
    """An image block's source as the URL a chat image_url part carries: base64 data as a
    data: URL, a url source as it is (fetched under the server's media policy)."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) \
            and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise bad_request("An image block's source is {type: base64, media_type, data} or "
                      "{type: url, url}.", param=f"{where}.source")


def _tool_result_text(block: dict, where: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                           and isinstance(b.get("text"), str) for b in content):
        text = "".join(b["text"] for b in content)
    else:
        raise bad_request("tool_result content must be a string or text blocks (this model "
                          "accepts text only).", param=f"{where}.content")
    # Anthropic's models see the error flag; a chat template has no field for it.
    return f"Error: {text}" if block.get("is_error") else text


# -- the reply ---------------------------------------------------------------------------
def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "content_filter":
        return "refusal"
    return "stop_sequence" if stop_sequence else "end_turn"


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    """Anthropic counts cache reads apart: input + cache_read + cache_creation = the prompt."""
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached_tokens}


def signature(thinking: str) -> str:
    """An opaque signature for a thinking block (Anthropic's are encrypted; clients only
    carry them back, and this server reads the thinking itself)."""
    return "k2serve-" + hashlib.sha256(thinking.encode()).hexdigest()


def content_blocks(message: dict) -> list[dict]:
    """A finished chat message (k2serve.api.chat_run.ChatRun.message) as content blocks."""
    blocks: list[dict] = []
    if message.get("reasoning_content"):
        thinking = message["reasoning_content"]
        blocks.append({"type": "thinking", "thinking": thinking,
                       "signature": signature(thinking)})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        blocks.append({"type": "tool_use", "id": tool_use_id(),
                       "name": call["function"]["name"],
                       "input": json.loads(call["function"]["arguments"] or "{}")})
    return blocks or [{"type": "text", "text": ""}]


async def stream_events(pieces: AsyncIterator[StreamPiece], start: dict, prompt_tokens: int
                        ) -> AsyncIterator[tuple[str, dict]]:
    """(event name, data) of Anthropic's stream from a one-choice chat run's pieces.

    `start` is the message as message_start shows it (empty content, null stop_reason)."""
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    index, open_kind = -1, None
    thinking = ""  # of the open thinking block

    def close():
        events = []
        if open_kind == "thinking":
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": signature(thinking)}}))
        return events + [("content_block_stop", {"type": "content_block_stop", "index": index})]

    async for piece in pieces:
        reasoning = piece.delta.get("reasoning_content")
        if reasoning:
            if open_kind != "thinking":
                if open_kind is not None:
                    for event in close():
                        yield event
                index, open_kind, thinking = index + 1, "thinking", ""
                yield "content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
            thinking += reasoning
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "thinking_delta",
                                                    "thinking": reasoning}}
        text = piece.delta.get("content")
        if text:
            if open_kind != "text":
                if open_kind is not None:
                    for event in close():
                        yield event
                index, open_kind = index + 1, "text"
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "text", "text": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta", "text": text}}
        for call in piece.delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if "name" in function:  # a new call opens its block
                if open_kind is not None:
                    for event in close():
                        yield event
                index, open_kind = index + 1, "tool_use"
                yield "content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": tool_use_id(),
                                      "name": function["name"], "input": {}}}
            if function.get("arguments"):
                yield "content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}}
        if piece.finish_reason is not None:
            if open_kind is not None:
                for event in close():
                    yield event
                open_kind = None
            totals = piece.usage or {}
            cached = (totals.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            yield "message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(piece.finish_reason, piece.stop_sequence),
                          "stop_sequence": piece.stop_sequence},
                "usage": usage(prompt_tokens, totals.get("completion_tokens", 0), cached)}
            yield "message_stop", {"type": "message_stop"}
