"""Tool calling for chat completions: validate `tools`/`tool_choice`, build the call grammar,
parse model output into OpenAI `tool_calls`.

Two formats:
- `kimi_k2` (a model whose vocabulary has K2's markers): tools are declared by its own chat
  template; calls are K2's native `<|tool_calls_section_begin|>…` text.
- `json` (every other model, e.g. the embedded SmolLM2): the server declares the tools in a
  system-prompt block and the reply is `<tool_call>[{"name", "arguments"}]</tool_call>`.

Whenever a call is made it is grammar-constrained (k2serve.structured): its name is a declared
tool and its arguments follow that tool's `parameters` schema. `auto` leaves the model free to
answer in text; `required` and a named function make the reply a call from its first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.errors import bad_request
from k2serve.serving.backend import GenerationBackend
from k2serve.structured.grammars import (
    EMPTY_PARAMETERS,
    TOOL_NAME,
    GrammarError,
    ThinkingSyntax,
    ToolSpec,
    check_json_schema,
    json_tool_grammar,
    k2_tool_grammar,
)
from k2serve.text.tool_parsers import (
    StreamingToolParser,
    normalize_tool_call_ids,
    parse_tool_calls,
)
from k2serve.text.tool_parsers.json_calls import (
    JsonStreamingToolParser,
    parse_json_tool_calls,
    render_tool_calls,
    tools_system_block,
)
from k2serve.text.tool_parsers.kimi_k2 import CALL_BEGIN, SECTION_BEGIN

MAX_TOOLS = 128


def declared_tools(req: ChatCompletionRequest) -> list[ToolSpec]:
    if len(req.tools or []) > MAX_TOOLS:
        raise bad_request(f"At most {MAX_TOOLS} tools may be declared.", param="tools")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(req.tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ...}}}}.", param=f"tools.{i}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string.",
                              param=f"tools.{i}.function.name")
        if not TOOL_NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name {name!r} must be 1-64 letters, digits, "
                              f"'_', '.' or '-'.", param=f"tools.{i}.function.name")
        if any(s.name == name for s in specs):
            raise bad_request(f"tools[{i}] declares the function '{name}' a second time.",
                              param=f"tools.{i}.function.name")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = EMPTY_PARAMETERS  # OpenAI: no parameters means an empty argument list
        else:
            try:
                check_json_schema(parameters, f"tools[{i}].function.parameters")
            except GrammarError as exc:
                raise bad_request(str(exc), param=f"tools.{i}.function.parameters") from None
        specs.append(ToolSpec(name, parameters))
    return specs


def chosen_function(tool_choice: Any) -> str | None:
    """The function a `tool_choice` names: "name" (Together) or {"type", "function": {name}}."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        return function.get("name") if isinstance(function, dict) else None
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return tool_choice
    return None


@dataclass
class ToolPlan:
    """How this request's tool calls are declared, constrained and parsed."""

    format: str  # "kimi_k2" | "json"
    specs: list[ToolSpec]
    named: str | None  # the one function tool_choice names
    parallel: bool
    whole_reply: bool  # True: the reply is the call block alone (required / named function)

    def grammar(self, thinking: ThinkingSyntax | None = None) -> str:
        """Lark text for k2serve.structured; `thinking`: the model reasons before its reply."""
        build = k2_tool_grammar if self.format == "kimi_k2" else json_tool_grammar
        return build(self.specs, self.named, self.parallel, not self.whole_reply, thinking)

    @property
    def call_markers(self) -> tuple[str, ...]:
        """Markers that open calls even inside a thinking block (K2-Thinking's habit)."""
        return (SECTION_BEGIN, CALL_BEGIN) if self.format == "kimi_k2" else ()

    def parse(self, text: str):
        return parse_tool_calls(text) if self.format == "kimi_k2" else parse_json_tool_calls(text)

    def streaming_parser(self):
        return StreamingToolParser() if self.format == "kimi_k2" else JsonStreamingToolParser()


def tool_format(backend: GenerationBackend) -> str:
    return backend.tool_format or "json"


def plan_tools(req: ChatCompletionRequest, backend: GenerationBackend) -> ToolPlan | None:
    """Validate the request's tools; a plan when the reply may hold tool calls."""
    specs = declared_tools(req)
    names = [s.name for s in specs]
    named = chosen_function(req.tool_choice)
    if req.tool_choice is not None and named is None and req.tool_choice not in (
            "auto", "none", "required"):
        raise bad_request("tool_choice must be 'auto', 'none', 'required', a function name or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                          param="tool_choice")
    if isinstance(req.tool_choice, dict) and named is None:
        raise bad_request("tool_choice {\"type\": \"function\"} needs \"function\": {\"name\": "
                          "...}.", param="tool_choice")
    if named is not None and named not in names:
        raise bad_request(f"tool_choice names the function '{named}', which is not among the "
                          f"declared tools ({', '.join(names) or 'none'}).", param="tool_choice")
    if req.tool_choice == "required" and not names:
        raise bad_request("tool_choice 'required' needs at least one tool in 'tools'.",
                          param="tool_choice")
    if not names or req.tool_choice == "none":
        return None
    parallel = req.parallel_tool_calls is not False
    with_text = named is None and req.tool_choice != "required"
    return ToolPlan(tool_format(backend), specs, named, parallel, whole_reply=not with_text)


def prepare_messages(messages: list[dict], backend: GenerationBackend,
                     tools: list[dict] | None, declare: bool) -> list[dict]:
    """K2 expects earlier calls' ids as functions.<name>:<idx> (Moonshot's vendor guidance).
    Other models get the tools in a system block (when `declare`) and earlier calls written in
    the format they are asked to use."""
    if backend.tool_format == "kimi_k2":
        return normalize_tool_call_ids(messages)
    out = []
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = _dicts(message["tool_calls"])
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = (message.get("content") or "") + render_tool_calls(calls)
        out.append(message)
    if declare and tools:
        block = tools_system_block(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _dicts(calls: list) -> list[dict]:
    return [c.model_dump(exclude_none=True) if hasattr(c, "model_dump") else dict(c)
            for c in calls]


def openai_tool_calls(calls) -> list[dict]:
    return [{"index": i, **call.to_openai()} for i, call in enumerate(calls)]


def finish_with_tools(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if has_tool_calls and finish_reason == "stop" else finish_reason
