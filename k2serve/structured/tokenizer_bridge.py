"""Our tokenizers as llguidance sees them: the bytes of every token id, and which ids are special.

Every `text.tokenizer_base.TokenizerBase` (HF tokenizers from GGUF or a checkpoint, K2's
tiktoken one) gives `token_bytes(id)`, `vocab_size`, `special_ids` and `stop_token_ids`, which is
all llguidance needs. Special tokens never match grammar text: they are produced only where a
grammar names them (`<|tool_calls_section_begin|>`), so free text cannot smuggle in a control
token.
"""

from __future__ import annotations

from typing import Any

import llguidance


def grammar_special_ids(tokenizer: Any) -> set[int]:
    """Ids that are control tokens for the grammar, not text.

    K2's five tool-call markers are added tokens with `"special": false` (so detokenizing keeps
    them for the tool parser), but for the grammar they are markers, like every id of K2's
    reserved range. Ids without bytes (unused slots) are kept out of text as well.
    """
    special = set(tokenizer.special_ids)
    base = getattr(tokenizer, "num_base_tokens", None)
    if base is not None:  # K2: every id after the BPE ranks is a reserved/added token
        special.update(range(base, tokenizer.vocab_size))
    return special


def is_grammar_special(tokenizer: Any, token_id: int) -> bool:
    """`token_id in grammar_special_ids(tokenizer)`, without building the set."""
    base = getattr(tokenizer, "num_base_tokens", None)
    return token_id in tokenizer.special_ids or (base is not None and token_id >= base)


class _Wrapper:
    """The duck-typed object `llguidance.TokenizerWrapper` reads."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        special = grammar_special_ids(tokenizer)
        self.tokens = []
        for i in range(tokenizer.vocab_size):
            data = tokenizer.token_bytes(i)
            if not data:  # an unused id: give it a name so llguidance keeps it out of text
                special.add(i)
                data = f"<[unused{i}]>".encode()
            self.tokens.append(data)
        self.special_token_ids = sorted(special)
        self.eos_token_id = min(tokenizer.stop_token_ids)
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def lltokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """Build the llguidance tokenizer (tens of ms for SmolLM2's 49k tokens; cache it)."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(tokenizer)),
                                  n_vocab=tokenizer.vocab_size,
                                  eos_token=sorted(tokenizer.stop_token_ids))
