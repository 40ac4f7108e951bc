"""The registry backend of one sentence-embedding model: its weights load in the background,
its forward passes run batched on a worker thread (EmbeddingBatcher)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from k2serve.embeddings.batcher import EmbeddingBatcher
from k2serve.serving.backend import QueuelessBackend
from k2serve.serving.background import BackgroundModel

# Padded tokens per forward pass: bounds activation memory (MPNet at 16k tokens: 50 MB per
# hidden state, ~300 MB of attention scores for 42 sequences of 384 tokens).
MAX_BATCH_TOKENS = 16384


class EmbeddingBackend(QueuelessBackend):
    """What /v1/embeddings and /v1/rerank use: `await encoder()`, `await embed(sequences)`."""

    endpoints = frozenset({"embeddings", "rerank"})

    def __init__(self, model_id: str, load_encoder: Callable[[], Any], *, max_tokens: int,
                 added_tokens: int = 2, truncates: bool = True):
        """load_encoder: runs on the loading thread, returns a SentenceEncoder (or an object
        with its interface: sequences, truncate, embed, dimensions, max_tokens, ...).
        added_tokens / truncates: for `reservation` (special tokens and prefixes per input;
        whether no input is read past max_tokens)."""
        self.model_id = model_id
        self.max_tokens = max_tokens  # the catalog's figure, known before the model loads
        self._added_tokens = added_tokens
        self._truncates = truncates
        self._batcher: EmbeddingBatcher | None = None

        def load():
            encoder = load_encoder()
            self.max_tokens = encoder.max_tokens
            self._batcher = EmbeddingBatcher(model_id, encoder.embed,
                                             max_batch_tokens=MAX_BATCH_TOKENS)
            encoder.warm_up()
            return encoder

        self._model = BackgroundModel(model_id, load)

    def start(self) -> EmbeddingBackend:
        self._model.start()
        return self

    @property
    def load_state(self) -> str:
        return self._model.state

    async def encoder(self):
        """The loaded SentenceEncoder (503 while loading past the wait, or if it failed)."""
        return await self._model.get()

    async def embed(self, sequences: list, priority: int = 0) -> np.ndarray:
        """`priority`: 0 interactive, 1 a batch line (runs while no interactive job waits)."""
        await self._model.get()
        return await self._batcher.embed(sequences, priority)

    @property
    def batch_stats(self):
        return self._batcher.stats if self._batcher else None

    def usage_bound(self, body: dict) -> int:
        """Tokens a request may use, without tokenizing (for the platform's TPM limits):
        WordPiece and SentencePiece tokens cover at least one character each, plus the
        special tokens (and prefix) added per input, at most max_tokens when inputs are
        truncated."""
        def bound(text) -> int:
            if not isinstance(text, (str, list)):  # list: token ids
                return 0
            n = len(text) + self._added_tokens
            return min(n, self.max_tokens) if self._truncates else n

        texts = []
        for key in ("input", "query", "documents"):
            value = body.get(key)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                if value and all(isinstance(v, int) for v in value):
                    texts.append(value)  # one token-id input
                else:
                    texts.extend(v if isinstance(v, (str, list)) else str(v) for v in value)
        return sum(bound(t) for t in texts)
