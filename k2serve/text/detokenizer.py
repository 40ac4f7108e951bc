"""Turn generated token ids into text deltas as they arrive.

A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK across
tokens), and some decoders change a token's text depending on what precedes it (SentencePiece
drops the space of the first token it sees). So each step decodes a short window of recent tokens
twice, with and without the new ones, and emits the difference once it no longer ends in an
incomplete character (vLLM's prefix/read offsets). The work per token stays small however long
the output gets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_REPLACEMENT = "\ufffd"

# Prompt tokens decoded before the first output token, to give it its left context.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """`add(token_id)` returns the text the new token completes; `flush()` the rest at the end.

    The concatenated deltas equal `tokenizer.decode(output_ids)` (or, with `prompt_ids`, the text
    `decode(prompt_ids + output_ids)` adds after `decode(prompt_ids)`).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True):
        self._decode = tokenizer.decode
        self._skip = skip_special_tokens
        tail = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = tail
        self._prefix = 0  # start of the window decoded for context
        self._read = len(tail)  # ids before this have been emitted
        self._prefix_text = self._text(0, self._read)
        self._n_prompt = len(tail)

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._n_prompt:]

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(int(t) for t in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an unfinished character, emitted as U+FFFD like `decode` does)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        new_text = self._text(self._prefix, len(self._ids))
        # Hold back while the last character may still be completed by a later token, and while the
        # new tokens show nothing (a skipped special token): they stay in the window as context.
        if not final and (new_text.endswith(_REPLACEMENT) or len(new_text) <= len(self._prefix_text)):
            return ""
        delta = new_text[len(self._prefix_text):]
        # Slide: the tokens just emitted become the context for the next ones.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._text(self._prefix, self._read)
        return delta

    def _text(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._decode(self._ids[start:end], skip_special_tokens=self._skip)
