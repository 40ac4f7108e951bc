"""What a chat choice's raw output says: reasoning, content and tool calls, whole or streamed.

A reasoning model's output goes through its reasoning splitter first (k2serve.text.reasoning);
what is not reasoning goes to the tool-call parser when the request declared tools. So every
surface (chat, Anthropic Messages, Responses) gets the same split from k2serve.api.chat_run:
a finished message with `reasoning_content`, or chat-delta pieces `{"reasoning_content": ...}`,
`{"content": ...}`, `{"tool_calls": [...]}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2serve.api.tools import ToolPlan, openai_tool_calls
from k2serve.serving.backend import GenerationBackend
from k2serve.structured.grammars import ThinkingSyntax
from k2serve.structured.tokenizer_bridge import is_grammar_special
from k2serve.text.reasoning import REASONING, ReasoningFormat, ReasoningSplitter


@dataclass(frozen=True)
class OutputPlan:
    """How one request's output is read."""

    tools: ToolPlan | None  # None: no tool calls to parse
    reasoning: ReasoningFormat | None  # None: the model does not reason
    opened: bool = False  # the prompt opened the thinking block

    def splitter(self) -> ReasoningSplitter | None:
        if self.reasoning is None:
            return None
        ends = self.tools.call_markers if self.tools is not None else ()
        return ReasoningSplitter(self.reasoning, self.opened, ends)

    def message(self, text: str) -> tuple[dict, bool, int]:
        """(assistant message, whether it holds tool calls, offset where reasoning ended)
        of a finished output."""
        reasoning, content, end = None, text, 0
        splitter = self.splitter()
        if splitter is not None:
            parts = splitter.feed(text) + splitter.finish()
            reasoning = "".join(t for kind, t in parts if kind == REASONING) or None
            content = "".join(t for kind, t in parts if kind != REASONING)
            end = splitter.reasoning_end or 0
        message: dict[str, Any] = {"role": "assistant", "content": content}
        has_calls = False
        if self.tools is not None:
            parsed = self.tools.parse(content)
            message["content"] = parsed.content
            if parsed.has_tool_calls:
                message["tool_calls"] = openai_tool_calls(parsed.tool_calls)
            has_calls = parsed.has_tool_calls
        if self.reasoning is not None:
            if reasoning is not None and not message["content"]:
                message["content"] = None
            message["reasoning_content"] = reasoning
        return message, has_calls, end


def output_plan(backend: GenerationBackend, tools: ToolPlan | None, prompt: str) -> OutputPlan:
    fmt = backend.reasoning
    return OutputPlan(tools, fmt, fmt is not None and fmt.opened_by(prompt))


def thinking_syntax(backend: GenerationBackend, plan: OutputPlan) -> ThinkingSyntax | None:
    """The thinking block as a tool-call grammar must allow it (None: the model does not
    reason). Its markers are the grammar's special tokens when the tokenizer has them so."""
    fmt = plan.reasoning
    if fmt is None:
        return None
    tokenizer = backend.tokenizer

    def special(marker: str) -> bool:
        token = tokenizer.token_to_id(marker)
        return token is not None and is_grammar_special(tokenizer, token)

    return ThinkingSyntax(fmt.start, fmt.end, special(fmt.start) and special(fmt.end),
                          plan.opened)


class ChoiceOutput:
    """One streamed choice: `feed(text)` / `finish()` give chat-delta pieces in order."""

    def __init__(self, plan: OutputPlan):
        self._splitter = plan.splitter()
        self._tools = plan.tools.streaming_parser() if plan.tools is not None else None
        self._marks: list[tuple[int, int]] = []  # (raw offset, tokens) of each delta
        self._fed = 0

    def feed(self, text: str, tokens: int = 0) -> list[dict]:
        self._marks.append((self._fed, tokens))
        self._fed += len(text)
        if not text:
            return []
        parts = self._splitter.feed(text) if self._splitter else [("content", text)]
        return self._pieces(parts)

    def finish(self) -> list[dict]:
        out = self._pieces(self._splitter.finish()) if self._splitter else []
        if self._tools is not None:
            out += self._tools.finish()
        return out

    @property
    def has_tool_calls(self) -> bool:
        return self._tools is not None and self._tools.result().has_tool_calls

    @property
    def reasoning_tokens(self) -> int:
        end = self._splitter.reasoning_end if self._splitter else 0
        return reasoning_tokens(self._marks, self._fed if end is None else end)

    def _pieces(self, parts: list[tuple[str, str]]) -> list[dict]:
        out: list[dict] = []
        for kind, text in parts:
            if kind == REASONING:
                out.append({"reasoning_content": text})
            elif self._tools is not None:
                out += self._tools.feed(text)
            else:
                out.append({"content": text})
        return out


def reasoning_tokens(marks: list[tuple[int, int]], end: int) -> int:
    """Tokens of the deltas that began before the reasoning ended (its end marker included)."""
    return sum(tokens for offset, tokens in marks if offset < end)
