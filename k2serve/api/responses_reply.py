"""The Response object and its streamed events (OpenAI Responses API), from a ChatRun's
finished message or its chat-delta pieces.

Output items: a reasoning model's `reasoning` item (its thinking as one `reasoning_text`
content part; no summary), a `message` with one `output_text` part for the reply's text, then
one `function_call` item per tool call. The stream is the typed event sequence the SDKs
assemble (`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.reasoning_text.delta`/`.done`,
`response.output_text.delta`/`.done`,
`response.function_call_arguments.delta`/`.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` / `.incomplete` / `.failed`), each
with its `sequence_number`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from k2serve.api.chat_run import StreamPiece
from k2serve.api.responses_request import new_id
from k2serve.api.wire_json import json_line
from k2serve.errors import APIError

# finish reason -> (status, incomplete_details.reason)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def status_of(finish_reason: str | None) -> tuple[str, dict | None]:
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def usage_of(usage: dict | None) -> dict | None:
    """Chat usage -> Responses usage."""
    if usage is None:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": (
                usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def response_object(response_id: str, body: dict, created_at: float, status: str, *,
                    output: list[dict] | None = None, usage: dict | None = None,
                    incomplete: dict | None = None, error: dict | None = None) -> dict:
    """The Response, echoing the request's settings as OpenAI does."""
    tools = body.get("tools") or []
    return {
        "id": response_id, "object": "response", "created_at": int(created_at),
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "background": bool(body.get("background")),
        "error": error, "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output or [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [dict(t, strict=t.get("strict", True))
                  if isinstance(t, dict) and t.get("type") == "function" else t
                  for t in tools],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def error_object(exc: BaseException) -> dict:
    if isinstance(exc, APIError):
        code = exc.code if exc.status < 500 else "server_error"
        return {"code": code or "server_error", "message": exc.message}
    return {"code": "server_error", "message": str(exc) or type(exc).__name__}


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant",
            "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed",
              item_id: str | None = None, namespaces: frozenset[str] = frozenset()) -> dict:
    """A function_call item; `name` as the model called it: a namespaced function's
    `namespace.name` is split back into its two fields."""
    item = {"id": item_id or new_id("fc"), "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}
    namespace, _, short = name.partition(".")
    if short and namespace in namespaces:
        item.update(name=short, namespace=namespace)
    return item


def tool_namespaces(tools: list | None) -> frozenset[str]:
    """The namespaces a request's `tools` declare."""
    return frozenset(t["name"] for t in tools or () if isinstance(t, dict)
                     and t.get("type") == "namespace" and isinstance(t.get("name"), str))


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("rs"), "type": "reasoning", "status": status,
            "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": None}


def output_items(message: dict, status: str, namespaces: frozenset[str] = frozenset()
                 ) -> list[dict]:
    """A finished chat message as output items (`namespaces`: see call_item)."""
    item_status = "incomplete" if status == "incomplete" else "completed"
    items = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(message["reasoning_content"], item_status))
    if message.get("content"):
        items.append(message_item(message["content"], item_status))
    for call in message.get("tool_calls") or []:
        function = call["function"]
        items.append(call_item(call.get("id") or new_id("call"), function["name"],
                               function.get("arguments") or "", item_status,
                               namespaces=namespaces))
    return items


def sse_event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json_line(event)}\n\n"


class EventStream:
    """Chat-delta pieces -> Responses events; `response` is the object as it stands (each
    event carries a snapshot of it, not the object that goes on changing)."""

    def __init__(self, response: dict):
        self.response = response
        self.sequence = 0
        self._open: dict | None = None  # the output item being streamed
        self._index = -1  # its output_index
        self._call_index = -1  # the chat tool call it streams, if a call

    def event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict]:
        return [self.event("response.created", response=_copy(self.response)),
                self.event("response.in_progress", response=_copy(self.response))]

    def piece(self, piece: StreamPiece) -> list[dict]:
        events: list[dict] = []
        reasoning = piece.delta.get("reasoning_content")
        if reasoning:
            if self._open is None or self._open["type"] != "reasoning":
                events += self._close()
                events += self._add(reasoning_item("", "in_progress"))
                events.append(self._part_event("response.content_part.added", ""))
            self._open["content"][0]["text"] += reasoning
            events.append(self.event("response.reasoning_text.delta", item_id=self._open["id"],
                                     output_index=self._index, content_index=0,
                                     delta=reasoning))
        text = piece.delta.get("content")
        if text:
            if self._open is None or self._open["type"] != "message":
                events += self._close()
                events += self._add(message_item("", "in_progress"))
                events.append(self._part_event("response.content_part.added", ""))
            self._open["content"][0]["text"] += text
            events.append(self.event("response.output_text.delta", item_id=self._open["id"],
                                     output_index=self._index, content_index=0, delta=text,
                                     logprobs=[]))
        for call in piece.delta.get("tool_calls") or []:
            function = call.get("function") or {}
            index = call.get("index", 0)
            if self._open is None or self._open["type"] != "function_call" \
                    or index != self._call_index:  # the first fragment of a new call
                self._call_index = index
                events += self._close()
                events += self._add(call_item(call.get("id") or new_id("call"),
                                              function.get("name") or "", "", "in_progress",
                                              namespaces=tool_namespaces(
                                                  self.response.get("tools"))))
            arguments = function.get("arguments")
            if arguments and self._open is not None and self._open["type"] == "function_call":
                self._open["arguments"] += arguments
                events.append(self.event("response.function_call_arguments.delta",
                                         item_id=self._open["id"], output_index=self._index,
                                         delta=arguments))
        return events

    def finish(self, finish_reason: str | None, usage: dict | None) -> list[dict]:
        status, incomplete = status_of(finish_reason)
        self._item_status = "incomplete" if status == "incomplete" else "completed"
        events = self._close()
        self.response.update(status=status, incomplete_details=incomplete,
                             usage=usage_of(usage),
                             completed_at=int(time.time()) if status == "completed" else None)
        return events + [self.event(f"response.{status}", response=_copy(self.response))]

    def fail(self, exc: BaseException) -> list[dict]:
        error = error_object(exc)
        self._item_status = "incomplete"
        events = self._close()
        self.response.update(status="failed", error=error)
        param = exc.param if isinstance(exc, APIError) else None
        return events + [self.event("error", code=error["code"], message=error["message"],
                                    param=param),
                         self.event("response.failed", response=_copy(self.response))]

    # -- items ------------------------------------------------------------------------------
    _item_status = "completed"

    def _add(self, item: dict) -> list[dict]:
        self._open = item
        self._index += 1
        self.response["output"].append(item)
        return [self.event("response.output_item.added", output_index=self._index,
                           item=_copy(item))]

    def _part_event(self, kind: str, text: str) -> dict:
        part = ({"type": "reasoning_text", "text": text} if self._open["type"] == "reasoning"
                else {"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        return self.event(kind, item_id=self._open["id"], output_index=self._index,
                          content_index=0, part=part)

    def _close(self) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        self._open = item  # the events below name it
        events = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events.append(self.event("response.reasoning_text.done", item_id=item["id"],
                                     output_index=self._index, content_index=0, text=text))
            events.append(self._part_event("response.content_part.done", text))
        elif item["type"] == "message":
            text = item["content"][0]["text"]
            events.append(self.event("response.output_text.done", item_id=item["id"],
                                     output_index=self._index, content_index=0, text=text,
                                     logprobs=[]))
            events.append(self._part_event("response.content_part.done", text))
        else:
            events.append(self.event("response.function_call_arguments.done",
                                     item_id=item["id"], output_index=self._index,
                                     arguments=item["arguments"]))
        item["status"] = self._item_status
        events.append(self.event("response.output_item.done", output_index=self._index,
                                 item=_copy(item)))
        self._open = None
        return events


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))


async def stream_events(pieces: AsyncIterator[StreamPiece], stream: EventStream
                        ) -> AsyncIterator[dict]:
    """Every event of a streamed response, its end included (a failure in-band)."""
    for event in stream.start():
        yield event
    try:
        async for piece in pieces:
            for event in stream.piece(piece):
                yield event
            if piece.finish_reason:
                for event in stream.finish(piece.finish_reason, piece.usage):
                    yield event
                return
    except Exception as exc:  # the generation failed after the 200: in-band, as OpenAI does
        for event in stream.fail(exc):
            yield event
