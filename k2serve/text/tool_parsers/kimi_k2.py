"""Kimi K2's tool-call format: parse model output, and rename history ids the way K2 expects.

The model writes (Moonshot's tool_call_guidance.md)

    {content}<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
    <|tool_call_argument_begin|>{JSON}<|tool_call_end|>...<|tool_calls_section_end|>

and ends the turn with <|im_end|>. `KimiK2Scanner` reads that text incrementally (a delta at a
time, holding back a tail that may be the start of a marker), so one code path serves both the
non-streaming `parse_tool_calls` and the streaming parser, which diffs scanner snapshots.

Rules (each answers a bug seen in vLLM/SGLang, shared/reference/kimi-k2/NOTES.md §4.4):
- Content is the text outside sections; markers never reach it. Text inside a section that is
  not part of a call (whitespace between calls) is dropped, not leaked as content.
- A call's id is `functions.NAME:IDX`; `NAME:IDX` and `functions.NAME` are accepted too, and NAME
  is what lies between the optional `functions.` prefix and `:IDX`: dotted and hyphenated names
  survive (Moonshot's sample parser splits on ".", vLLM keeps the text after the last dot, and
  SGLang's word-character class drops "-"). An id of neither form (e.g. "call_abc") names no
  function and is invalid.
- Arguments must be a JSON object. The raw text (whitespace-trimmed) is returned unchanged.
- A call that is malformed (bad id, bad JSON, an argument marker or end marker missing) is not
  returned as a tool call; it is reported in `invalid_tool_calls` with the reason, so the API can
  log it. Its text does not become content.
- A section without `<|tool_calls_section_end|>` (generation cut by max_tokens) ends at the end of
  the text: complete calls before the cut are kept, the cut-off call is invalid.
- A `<|tool_call_begin|>` outside a section opens one (the section marker was left out).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))
_MARKER_PREFIXES = frozenset(m[:k] for m in MARKERS for k in range(1, len(m)))
_MAX_HOLD = max(len(m) for m in MARKERS) - 1
# NAME: no whitespace, markers or colons, and ends in a word character or "-" (not "functions.").
_CALL_ID = re.compile(r"(?P<prefix>functions\.)?(?P<name>[^\s<>:]*[\w-])(?::(?P<idx>\d+))?")


@dataclass(frozen=True)
class ToolCall:
    """A parsed call. `id` is the model's own (e.g. "functions.get_weather:0"): the client echoes
    it back as `tool_call_id` and the template writes it into the next prompt."""

    id: str
    name: str
    arguments: str  # a JSON object, as the model wrote it
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class InvalidToolCall:
    """A call the model started but did not write correctly; never passed off as a tool call."""

    raw_id: str
    raw_arguments: str | None  # None when the argument marker never came
    reason: str


@dataclass
class ParsedOutput:
    content: str | None  # None when there is no text outside the tool-call section
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)

    @property
    def has_tool_calls(self) -> bool:
        """The API reports finish_reason "tool_calls" when this is true."""
        return bool(self.tool_calls)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split a finished K2 output into content and tool calls."""
    scanner = KimiK2Scanner()
    scanner.feed(text)
    scanner.finish()
    return scanner.result()


# ---- the scanner ---------------------------------------------------------------------------------

_CONTENT, _SECTION, _CALL_ID_STATE, _ARGUMENTS = "content", "section", "id", "arguments"


@dataclass
class CallState:
    """One call as far as it has been read."""

    raw_id: str = ""
    raw_arguments: str | None = None  # set once <|tool_call_argument_begin|> is read
    status: str = "open"  # "open" -> "valid" | "invalid"
    reason: str = ""
    name: str | None = None  # set once the id is complete and well formed

    @property
    def id(self) -> str:
        return self.raw_id.strip()

    def visible_arguments(self) -> str:
        """The arguments so far, trimmed like the final ones: a prefix of what `ToolCall.arguments`
        will be if the call turns out valid."""
        return (self.raw_arguments or "").strip()


class KimiK2Scanner:
    """`feed(delta)` text as it arrives, `finish()` at the end; `content_parts` and `calls` hold
    what has been read. A tail that may still grow into a marker is held back until it cannot
    (or until `finish`)."""

    def __init__(self) -> None:
        self.content_parts: list[str] = []
        self.calls: list[CallState] = []
        self._state = _CONTENT
        self._pending = ""
        self.finished = False

    def feed(self, delta: str) -> None:
        if self.finished:
            raise RuntimeError("feed() after finish()")
        text, pos = self._pending + delta, 0
        for m in _MARKER.finditer(text):
            self._text(text[pos:m.start()])
            self._marker(m.group())
            pos = m.end()
        rest = text[pos:]
        hold = _partial_marker_length(rest)
        self._text(rest[:len(rest) - hold])
        self._pending = rest[len(rest) - hold:]

    def finish(self) -> None:
        """No more text: a held tail is plain text, and a call still open was cut off."""
        if self.finished:
            return
        self._text(self._pending)
        self._pending = ""
        if self._state in (_CALL_ID_STATE, _ARGUMENTS):
            self._close(valid_end=False, reason="cut off before <|tool_call_end|>")
        self.finished = True

    def result(self) -> ParsedOutput:
        content = "".join(self.content_parts)
        return ParsedOutput(
            content=content or None,
            tool_calls=[ToolCall(c.id, c.name, c.visible_arguments()) for c in self.calls
                        if c.status == "valid"],
            invalid_tool_calls=[InvalidToolCall(c.id, c.raw_arguments, c.reason) for c in self.calls
                                if c.status == "invalid"],
        )

    # -- state machine ------------------------------------------------------------------------

    def _text(self, s: str) -> None:
        if not s:
            return
        if self._state == _CONTENT:
            self.content_parts.append(s)
        elif self._state == _CALL_ID_STATE:
            self.calls[-1].raw_id += s
        elif self._state == _ARGUMENTS:
            self.calls[-1].raw_arguments += s
        # _SECTION: text between calls (whitespace) belongs to no call and is not content.

    def _marker(self, marker: str) -> None:
        state = self._state
        if marker == CALL_BEGIN:
            if state in (_CALL_ID_STATE, _ARGUMENTS):
                self._close(valid_end=False, reason="next call began before <|tool_call_end|>")
            self.calls.append(CallState())
            self._state = _CALL_ID_STATE
        elif marker == SECTION_BEGIN:
            if state == _CONTENT:
                self._state = _SECTION
            elif state in (_CALL_ID_STATE, _ARGUMENTS):
                self._spoil("stray <|tool_calls_section_begin|> inside a call")
        elif marker == SECTION_END:
            if state in (_CALL_ID_STATE, _ARGUMENTS):
                self._close(valid_end=False, reason="section ended before <|tool_call_end|>")
            self._state = _CONTENT
        elif marker == ARGUMENT_BEGIN:
            if state == _CALL_ID_STATE:
                call = self.calls[-1]
                call.raw_arguments = ""
                call.name = _function_name(call.id)
                self._state = _ARGUMENTS
            elif state == _ARGUMENTS:
                self._spoil("second <|tool_call_argument_begin|> in a call")
        elif marker == CALL_END:
            if state in (_CALL_ID_STATE, _ARGUMENTS):
                self._close(valid_end=True, reason="")
        # Markers out of place elsewhere (an end marker in content) are dropped.

    def _spoil(self, reason: str) -> None:
        call = self.calls[-1]
        call.reason = call.reason or reason

    def _close(self, valid_end: bool, reason: str) -> None:
        call = self.calls[-1]
        self._state = _SECTION
        if call.raw_arguments is None:
            call.status, call.reason = "invalid", reason or "no <|tool_call_argument_begin|>"
            return
        if not call.reason and not valid_end:
            call.reason = reason
        if not call.reason and call.name is None:
            call.reason = f"tool call id {call.id!r} is not functions.NAME:IDX"
        if not call.reason:
            call.reason = _json_object_error(call.visible_arguments())
        call.status = "invalid" if call.reason else "valid"


def _partial_marker_length(text: str) -> int:
    """Length of the longest tail of `text` that is the start of a marker (0 if none)."""
    start = max(0, len(text) - _MAX_HOLD)
    i = text.find("<", start)
    while i != -1:
        if text[i:] in _MARKER_PREFIXES:
            return len(text) - i
        i = text.find("<", i + 1)
    return 0


def _function_name(call_id: str) -> str | None:
    m = _CALL_ID.fullmatch(call_id)
    if m is None or not (m.group("prefix") or m.group("idx")):
        return None  # e.g. "call_abc123": no sign of which function it calls
    return m.group("name")


def _json_object_error(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except ValueError as e:
        return f"arguments are not valid JSON: {e}"
    return "" if isinstance(value, dict) else "arguments are not a JSON object"


# ---- history ids ---------------------------------------------------------------------------------


def normalize_tool_call_ids(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Rename history tool-call ids to `functions.NAME:IDX` before rendering (Moonshot's API does).

    K2 continues the ids it sees: ids like "call_abc123" or "search:0" in history make it emit
    malformed ids (K2-Vendor-Verifier, "Rename Tool Call IDs"). IDX counts every call in the
    conversation from 0, in order, not per turn. Each `tool` message's `tool_call_id` follows its
    call: matched by old id within the latest assistant turn (then any earlier one), or, when the
    id is missing or unknown, by position among the turn's still-unanswered calls.

    Returns new dicts; the input is not modified. Calls without a function name keep their id.
    """
    out: list[dict[str, Any]] = []
    counter = 0
    turn: list[tuple[str | None, str]] = []  # (old id, new id) of the latest assistant turn's calls
    answered: set[int] = set()  # positions in `turn` a tool message has already claimed
    earlier: dict[str, str] = {}  # old id -> new id from earlier turns
    for message in messages:
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        message = dict(message)
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            earlier.update((old, new) for old, new in turn if old)
            turn, answered = [], set()
            calls = []
            for call in message["tool_calls"]:
                call = _as_dict(call)
                function = _as_dict(call.get("function") or {})
                old = call.get("id")
                if function.get("name"):
                    call["id"] = f"functions.{function['name']}:{counter}"
                counter += 1
                turn.append((old, call.get("id")))
                calls.append(call)
            message["tool_calls"] = calls
        elif role == "tool":
            new = _match_tool_result(message.get("tool_call_id"), turn, answered, earlier)
            if new is not None:
                message["tool_call_id"] = new
        out.append(message)
    return out


def _match_tool_result(old: str | None, turn: list[tuple[str | None, str]], answered: set[int],
                       earlier: dict[str, str]) -> str | None:
    same = [i for i, (o, _) in enumerate(turn) if old and o == old]
    for i in same:
        if i not in answered:
            answered.add(i)
            return turn[i][1]
    if same:  # answered twice: same call
        return turn[same[0]][1]
    if old and old in earlier:
        return earlier[old]
    for i in range(len(turn)):  # missing or unknown id: the next unanswered call
        if i not in answered:
            answered.add(i)
            return turn[i][1]
    return None


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return dict(value) if isinstance(value, Mapping) else {}
