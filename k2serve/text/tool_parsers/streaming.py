"""Stream K2 output as OpenAI chat-completion deltas: content, then tool calls piece by piece.

Each step feeds the new text to the scanner and diffs what it has read against what was already
sent (vLLM's re-parse-and-diff design, without re-reading the whole text each step). So the
deltas depend only on the text, not on how it was split: a delta bundling several tokens, or a
marker split across deltas, gives the same stream.
"""

from __future__ import annotations

from typing import Any

from .kimi_k2 import CallState, KimiK2Scanner, ParsedOutput


class StreamingToolParser:
    """`feed(text_delta)` and `finish()` return OpenAI `delta` objects to send, in order:
    `{"content": str}`, `{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}]}` when a call's header is known, then `{"tool_calls": [{"index", "function":
    {"arguments": fragment}}]}`. `result()` after `finish()` is the non-streaming parse.

    A call is announced once its id is well formed and its arguments begin with "{". Streaming
    cannot take back what it sent: if an announced call then proves malformed or is cut off, its
    index is added to `withdrawn` (and later calls keep their stream indexes), while `result()`
    leaves it out. The API should not report finish_reason "tool_calls" for withdrawn calls alone.
    """

    def __init__(self) -> None:
        self._scanner = KimiK2Scanner()
        self._content_sent = 0  # content parts already sent
        self._stream_index: dict[int, int] = {}  # scanner call position -> OpenAI `index`
        self._args_sent: dict[int, int] = {}  # scanner call position -> argument chars sent
        self._settled = 0  # calls before this position are closed and fully sent
        self.withdrawn: list[int] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._scanner.feed(delta)
        return self._diff()

    def finish(self) -> list[dict[str, Any]]:
        """End of generation: what was held back (text that might have begun a marker)."""
        self._scanner.finish()
        return self._diff()

    def result(self) -> ParsedOutput:
        if not self._scanner.finished:
            raise RuntimeError("result() before finish()")
        return self._scanner.result()

    @property
    def announced(self) -> int:
        """Number of tool calls announced so far (the next stream index)."""
        return len(self._stream_index)

    def _diff(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        parts = self._scanner.content_parts
        if len(parts) > self._content_sent:
            text = "".join(parts[self._content_sent:])
            self._content_sent = len(parts)
            if text:
                out.append({"content": text})
        calls = self._scanner.calls
        for pos in range(self._settled, len(calls)):
            out.extend(self._call_deltas(pos, calls[pos]))
        while self._settled < len(calls) and calls[self._settled].status != "open":
            self._settled += 1
        return out

    def _call_deltas(self, pos: int, call: CallState) -> list[dict[str, Any]]:
        out = []
        index = self._stream_index.get(pos)
        spoiled = call.status == "invalid" or bool(call.reason)
        if index is None:
            if spoiled or call.name is None or not _arguments_started(call):
                return out
            index = self._stream_index[pos] = len(self._stream_index)
            self._args_sent[pos] = 0
            out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
        if spoiled:
            if call.status == "invalid" and index not in self.withdrawn:
                self.withdrawn.append(index)
            return out
        args = call.visible_arguments()
        sent = self._args_sent[pos]
        if len(args) > sent:
            out.append({"tool_calls": [{"index": index, "function": {"arguments": args[sent:]}}]})
            self._args_sent[pos] = len(args)
        return out


def _arguments_started(call: CallState) -> bool:
    # Before the first "{" nothing says this is a real call; a finished valid call always is.
    return call.status == "valid" or call.visible_arguments().startswith("{")
