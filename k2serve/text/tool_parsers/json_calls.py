"""Our JSON tool-call format, for models without a native one (the embedded SmolLM2).

The server declares the tools in the system prompt and constrains the reply (k2serve.structured)
to either plain text or exactly

    <tool_call>[{"name": "NAME", "arguments": {...}}, ...]</tool_call>

`JsonCallScanner` reads that text incrementally, keeping each call's arguments as the model
wrote them, so streamed argument fragments add up to the final `arguments` string. Calls get
OpenAI-style ids (`call_` + 24 hex digits). A call cut off by max_tokens is not returned; the
complete calls before it are.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .kimi_k2 import InvalidToolCall, ParsedOutput, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*[\[,]\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*'
                     r'"arguments"\s*:\s*')
_ITEM_END = re.compile(r"\s*\}")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class JsonCall:
    id: str
    name: str
    arguments: str = ""  # as written so far
    complete: bool = False


@dataclass
class JsonCallScanner:
    content: str = ""
    calls: list[JsonCall] = field(default_factory=list)
    mode: str = "undecided"  # -> "content" | "calls"
    finished: bool = False
    _buf: str = ""  # text of the call block after OPEN
    _pos: int = 0  # next unread position in _buf
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _state: str = "header"  # header | arguments | item_end

    def feed(self, delta: str) -> None:
        if self.mode == "content":
            self.content += delta
            return
        if self.mode == "undecided":
            head = self.content + delta
            if head.startswith(OPEN):
                self.mode, self.content, delta = "calls", "", head[len(OPEN):]
            elif OPEN.startswith(head):
                self.content = head  # may still become OPEN: hold it
                return
            else:
                self.mode, self.content = "content", head
                return
        self._buf += delta
        self._scan()

    def finish(self) -> None:
        if self.mode == "undecided":
            self.mode = "content"
        self.finished = True

    def result(self) -> ParsedOutput:
        calls, invalid = [], []
        for call in self.calls:
            error = _object_error(call.arguments) if call.complete else "cut off"
            if error:
                invalid.append(InvalidToolCall(call.id, call.arguments, error))
            else:
                calls.append(ToolCall(call.id, call.name, call.arguments))
        return ParsedOutput(content=self.content or None, tool_calls=calls,
                            invalid_tool_calls=invalid)

    def _scan(self) -> None:
        buf = self._buf
        while self._pos < len(buf):
            if self._state == "header":
                m = _HEADER.match(buf, self._pos)
                if m is None or m.end() == len(buf):
                    return  # incomplete (or the block's end): wait for more
                self.calls.append(JsonCall(new_call_id(), json.loads(f'"{m["name"]}"')))
                self._pos, self._state, self._depth = m.end(), "arguments", 0
            elif self._state == "arguments":
                start = self._pos
                while self._pos < len(buf) and self._state == "arguments":
                    self._step(buf[self._pos])
                    self._pos += 1
                self.calls[-1].arguments += buf[start:self._pos]
            else:  # item_end
                m = _ITEM_END.match(buf, self._pos)
                if m is None:
                    return
                self.calls[-1].complete = True
                self._pos, self._state = m.end(), "header"

    def _step(self, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._state = "item_end"


def _object_error(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        return f"arguments are not valid JSON: {exc}"
    return "" if isinstance(value, dict) else "arguments are not a JSON object"


def parse_json_tool_calls(text: str) -> ParsedOutput:
    scanner = JsonCallScanner()
    scanner.feed(text)
    scanner.finish()
    return scanner.result()


class JsonStreamingToolParser:
    """Same interface and delta shapes as the K2 `StreamingToolParser`: content, then per call
    a header delta (index, id, type, name, arguments "") and argument fragments."""

    def __init__(self) -> None:
        self._scanner = JsonCallScanner()
        self._content_sent = 0
        self._args_sent: list[int] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._scanner.feed(delta)
        return self._diff()

    def finish(self) -> list[dict[str, Any]]:
        self._scanner.finish()
        return self._diff()

    def result(self) -> ParsedOutput:
        return self._scanner.result()

    def _diff(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        s = self._scanner
        if s.mode == "content" and len(s.content) > self._content_sent:
            out.append({"content": s.content[self._content_sent:]})
            self._content_sent = len(s.content)
        for index, call in enumerate(s.calls):
            if index == len(self._args_sent):
                self._args_sent.append(0)
                out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            sent = self._args_sent[index]
            if len(call.arguments) > sent:
                out.append({"tool_calls": [{"index": index,
                                            "function": {"arguments": call.arguments[sent:]}}]})
                self._args_sent[index] = len(call.arguments)
        return out


def render_tool_calls(tool_calls: list[dict]) -> str:
    """An assistant turn's calls as the model is asked to write them (for the history)."""
    items = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        items.append({"name": function.get("name"), "arguments": arguments})
    return OPEN + json.dumps(items, ensure_ascii=False) + CLOSE


def tools_system_block(tools: list[dict]) -> str:
    """The system-prompt text that declares the tools (documented in the README)."""
    lines = [json.dumps({k: f[k] for k in ("name", "description", "parameters") if k in f},
                        ensure_ascii=False)
             for f in (t.get("function") or {} for t in tools)]
    return ("# Tools\n\nYou may call one or more functions to answer the user. The functions:\n"
            "<tools>\n" + "\n".join(lines) + "\n</tools>\n\n"
            "To call functions, reply with only " + OPEN
            + '[{"name": <function name>, "arguments": <arguments as a JSON object>}]' + CLOSE
            + ". Otherwise, reply in plain text.")
