"""Tool calling for chat completions: validate `tools`/`tool_choice`, parse model output.

A model with a native tool-call format (Kimi K2's markers) gets its tools declared by its
own chat template and its output parsed into OpenAI `tool_calls`. Enforcing `required` or
a named function needs constrained decoding, which is not in this server yet: those are
refused rather than silently not enforced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from k2serve.api.errors import bad_request
from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.serving.text_backend import TextBackend
from k2serve.text.tool_parsers import (StreamingToolParser, normalize_tool_call_ids,
                                       parse_tool_calls)


def declared_tool_names(req: ChatCompletionRequest) -> list[str]:
    names = []
    for i, tool in enumerate(req.tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ...}}}}.", param=f"tools.{i}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string.",
                              param=f"tools.{i}.function.name")
        names.append(name)
    return names


def chosen_function(tool_choice: Any) -> str | None:
    """The function a `tool_choice` names: "name" (Together) or {"type", "function": {name}}."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        return function.get("name") if isinstance(function, dict) else None
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return tool_choice
    return None


def parses_tool_calls(req: ChatCompletionRequest, backend: TextBackend) -> bool:
    """Validate the request's tools; True when the reply's tool calls are to be parsed."""
    names = declared_tool_names(req)
    named = chosen_function(req.tool_choice)
    if named is not None and named not in names:
        raise bad_request(f"tool_choice names the function '{named}', which is not among the "
                          f"declared tools ({', '.join(names) or 'none'}).", param="tool_choice")
    if req.tool_choice is not None and named is None and req.tool_choice not in (
            "auto", "none", "required"):
        raise bad_request("tool_choice must be 'auto', 'none', 'required', a function name or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                          param="tool_choice")
    if not names or req.tool_choice == "none":
        return False
    if backend.tool_format is None:
        raise bad_request(f"Model '{req.model}' has no native tool-call format; tool calling for "
                          f"it is not supported yet.", param="tools", code="unsupported_parameter")
    if req.tool_choice == "required" or named is not None:
        raise bad_request("tool_choice 'required' or a named function needs constrained "
                          "decoding, which this server does not support yet; use 'auto'.",
                          param="tool_choice", code="unsupported_parameter")
    return True


def prepare_messages(messages: list[dict], backend: TextBackend) -> list[dict]:
    """K2 expects earlier calls' ids as functions.<name>:<idx> (Moonshot's vendor guidance)."""
    if backend.tool_format == "kimi_k2":
        return normalize_tool_call_ids(messages)
    return messages


def openai_tool_calls(calls) -> list[dict]:
    return [{"index": i, **call.to_openai()} for i, call in enumerate(calls)]


def finish_with_tools(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if has_tool_calls and finish_reason == "stop" else finish_reason


def parse_message(text: str) -> tuple[dict, bool]:
    """(assistant message, whether it holds tool calls) from a finished output."""
    parsed = parse_tool_calls(text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.has_tool_calls:
        message["tool_calls"] = openai_tool_calls(parsed.tool_calls)
    return message, parsed.has_tool_calls


@dataclass
class StreamingToolState:
    """One streaming parser per choice."""

    n: int
    parsers: list[StreamingToolParser] = field(default_factory=list)

    def __post_init__(self):
        self.parsers = [StreamingToolParser() for _ in range(self.n)]

    def deltas(self, index: int, text: str, finished: bool) -> list[dict]:
        parser = self.parsers[index]
        out = parser.feed(text) if text else []
        if finished:
            out += parser.finish()
        return out

    def has_tool_calls(self, index: int) -> bool:
        return self.parsers[index].result().has_tool_calls
