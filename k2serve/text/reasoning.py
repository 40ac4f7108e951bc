"""Reasoning ("thinking") in model output: which models write it, and splitting it from the reply.

A reasoning model writes `<think>…</think>` before its answer (Qwen3, DeepSeek-R1, Kimi
K2-Thinking). Some templates open the block in the prompt (the reply starts inside it);
K2-Thinking's does not (the model writes `<think>` itself). K2-Thinking may also open its
tool-call section without closing the block first: a tool-call marker then ends the
reasoning too (`implicit_ends`), as vLLM's kimi_k2 reasoning parser does.

`ReasoningSplitter` reads the output a delta at a time, holding back a tail that may be the
start of a marker, so the split does not depend on how the text was cut into deltas;
`split_reasoning` is the same on a whole text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k2serve.text.chat_template import ChatTemplate

THINK_START, THINK_END = "<think>", "</think>"
# Template variables that turn thinking off when false (Qwen3/GLM: enable_thinking;
# DeepSeek-V3.1, Kimi K2.5: thinking).
SWITCHES = ("enable_thinking", "thinking")


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning, and the template variable (if any) that turns it off."""

    start: str = THINK_START
    end: str = THINK_END
    switch: str | None = None

    def opened_by(self, prompt: str) -> bool:
        """Whether the rendered prompt already opened the block (the reply starts inside it)."""
        return prompt.rstrip().endswith(self.start)


def reasoning_format(template: ChatTemplate | None) -> ReasoningFormat | None:
    """The model reasons if its chat template writes the end of a thinking block (templates
    of reasoning models render, or strip, earlier turns' `<think>…</think>`)."""
    if template is None or THINK_END not in template.source:
        return None
    variables = template.variables()
    switch = next((name for name in SWITCHES if name in variables), None)
    return ReasoningFormat(switch=switch)


REASONING, CONTENT = "reasoning", "content"
_OPENING = "opening"  # nothing read yet but whitespace or the start of the start marker


class ReasoningSplitter:
    """`feed(delta)` / `finish()` return [(kind, text)] with kind "reasoning" or "content",
    in order. `reasoning_end` is the offset in the raw output where reasoning ended (after the
    end marker, or at a tool-call marker); 0 when the reply did not reason; None until known.
    """

    def __init__(self, fmt: ReasoningFormat, opened: bool = False,
                 implicit_ends: tuple[str, ...] = ()):
        self.fmt = fmt
        self._ends = (fmt.end, *implicit_ends)
        self._prefixes = frozenset(m[:k] for m in self._ends for k in range(1, len(m)))
        self._state = REASONING if opened else _OPENING
        self._strip = opened  # leading newlines of a part are formatting, not text
        self._pending = ""
        self._fed = 0
        self.reasoning_end: int | None = None
        self.finished = False

    @property
    def in_reasoning(self) -> bool:
        return self._state == REASONING

    def feed(self, delta: str) -> list[tuple[str, str]]:
        if self.finished:
            raise RuntimeError("feed() after finish()")
        text, base = self._pending + delta, self._fed - len(self._pending)
        self._fed += len(delta)
        self._pending = ""
        out: list[tuple[str, str]] = []
        while True:
            if self._state == _OPENING:
                stripped = text.lstrip()
                if stripped.startswith(self.fmt.start):
                    skip = len(text) - len(stripped) + len(self.fmt.start)
                    text, base = text[skip:], base + skip
                    self._state, self._strip = REASONING, True
                    continue
                if self.fmt.start.startswith(stripped):  # may still become the marker
                    self._pending = text
                    return out
                self._state, self.reasoning_end = CONTENT, base
                continue
            if self._strip:
                stripped = text.lstrip("\n")
                base += len(text) - len(stripped)
                text = stripped
                self._strip = not text
            if self._state == CONTENT:
                _add(out, CONTENT, text)
                return out
            at, marker = self._first_end(text)
            if marker is None:
                hold = self._partial_end(text)
                _add(out, REASONING, text[:len(text) - hold])
                self._pending = text[len(text) - hold:]
                return out
            _add(out, REASONING, text[:at])
            cut = at + len(marker) if marker == self.fmt.end else at  # a call marker stays
            text, base = text[cut:], base + cut
            self._state, self.reasoning_end = CONTENT, base
            self._strip = marker == self.fmt.end

    def finish(self) -> list[tuple[str, str]]:
        """End of output: a held tail is text; reasoning never closed ran to the end."""
        if self.finished:
            return []
        self.finished = True
        out: list[tuple[str, str]] = []
        text, self._pending = self._pending, ""
        if self._state == REASONING:
            _add(out, REASONING, text)
            self.reasoning_end = self._fed
        else:
            _add(out, CONTENT, text)
            if self.reasoning_end is None:
                self.reasoning_end = 0
        return out

    def _first_end(self, text: str) -> tuple[int, str | None]:
        best, found = len(text), None
        for marker in self._ends:
            i = text.find(marker, 0, best + len(marker))
            if i != -1 and i < best:
                best, found = i, marker
        return best, found

    def _partial_end(self, text: str) -> int:
        for k in range(min(len(text), max(map(len, self._ends)) - 1), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0


def _add(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if not text:
        return
    if out and out[-1][0] == kind:
        out[-1] = (kind, out[-1][1] + text)
    else:
        out.append((kind, text))


@dataclass
class SplitOutput:
    reasoning: str | None  # None when the reply did not reason (or its block was empty)
    content: str
    reasoning_end: int  # offset in the raw text where the reasoning ended (0: none)


def split_reasoning(text: str, fmt: ReasoningFormat, opened: bool = False,
                    implicit_ends: tuple[str, ...] = ()) -> SplitOutput:
    splitter = ReasoningSplitter(fmt, opened, implicit_ends)
    parts = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for kind, t in parts if kind == REASONING)
    content = "".join(t for kind, t in parts if kind == CONTENT)
    return SplitOutput(reasoning or None, content, splitter.reasoning_end or 0)
