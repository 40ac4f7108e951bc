"""Compile grammars once per tokenizer (cached), and give every sequence its own matcher.

Compiling builds llguidance's lexer and parser tables for a grammar and this tokenizer; it runs
in the API layer on a worker thread before the request reaches the engine, so a new schema never
stalls the decode step. The engine only copies the compiled matcher (microseconds) and advances it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import llguidance
import torch

from .grammars import GrammarError, library_error
from .tokenizer_bridge import lltokenizer

CACHE_SIZE = 256  # compiled grammars kept per tokenizer (LRU)


class GrammarMatcher:
    """One sequence's position in its grammar: fills its allowed-token bitmask row, and is
    advanced by each token the sampler picks."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """bitmask: int32 [B, ceil(vocab/32)], CPU, contiguous."""
        target = bitmask[row]
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and cannot be extended (only an end token may follow)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def reset(self) -> None:
        self._m.reset()


class CompiledGrammar:
    """A grammar compiled for one tokenizer; `new_matcher()` for each sequence that uses it.
    `source` is its Lark text, for an upstream engine that enforces it itself."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, source: str = ""):
        self._template = matcher
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.source = source

    def new_matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = lltokenizer(self._tokenizer)
            return self._lltok

    def prepare_in_background(self) -> threading.Thread:
        """Build llguidance's view of the vocabulary now, on a daemon thread (0.2-1 s for a
        50k-160k vocabulary), so that the first structured request does not wait for it."""
        thread = threading.Thread(target=lambda: self.lltokenizer, name="k2serve-llg-tokenizer",
                                  daemon=True)
        thread.start()
        return thread

    def compile(self, grammar: str, *, what: str = "The grammar",
                param: str = "response_format") -> CompiledGrammar:
        """Blocking (run it off the event loop). Raises GrammarError naming the problem."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return cached
        lltok = self.lltokenizer
        library_error(grammar, lltok, what, param)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{what} cannot be used: {matcher.get_error()}.", param)
        compiled = CompiledGrammar(matcher, self._tokenizer.vocab_size, source=grammar)
        with self._lock:
            self.misses += 1
            self._cache[grammar] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


_COMPILERS: dict[int, tuple[Any, GrammarCompiler]] = {}
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    """The compiler of a tokenizer object (one per loaded model)."""
    with _COMPILERS_LOCK:
        entry = _COMPILERS.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, GrammarCompiler(tokenizer))
            _COMPILERS[id(tokenizer)] = entry
        return entry[1]
