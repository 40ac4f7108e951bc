"""The registry backend of one sentence-embedding model: its weights load in the background,
its forward passes run batched on a worker thread (EmbeddingBatcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from k2serve.embeddings.batcher import EmbeddingBatcher
from k2serve.serving.background import BackgroundModel

# Padded tokens per forward pass: bounds activation memory (MPNet: ~16k tokens x 768 x 4 B
# per hidden state, attention scores per 128 x 128 block of sequences and keys).
MAX_BATCH_TOKENS = 16384


class EmbeddingBackend:
    """What /v1/embeddings and /v1/rerank use: `await encoder()`, `await embed(sequences)`."""

    def __init__(self, model_id: str, locate: Callable[[], Path], *, max_tokens: int):
        from k2serve.embeddings.sentence_encoder import SentenceEncoder  # torch: not at import

        self.model_id = model_id
        self.max_tokens = max_tokens  # the catalog's figure, known before the model loads
        self._batcher: EmbeddingBatcher | None = None

        def load():
            encoder = SentenceEncoder(str(locate()))
            self.max_tokens = encoder.max_tokens
            self._batcher = EmbeddingBatcher(model_id, encoder.embed,
                                             max_batch_tokens=MAX_BATCH_TOKENS)
            encoder.embed([encoder.wrap([])])  # first-call costs paid before any request
            return encoder

        self._model = BackgroundModel(model_id, load)

    def start(self) -> EmbeddingBackend:
        self._model.start()
        return self

    @property
    def state(self) -> str:
        return self._model.state

    async def encoder(self):
        """The loaded SentenceEncoder (503 while loading past the wait, or if it failed)."""
        return await self._model.get()

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        await self._model.get()
        return await self._batcher.embed(sequences)

    @property
    def batch_stats(self):
        return self._batcher.stats if self._batcher else None

    def reservation(self, body: dict) -> int:
        """Tokens a request may use, without tokenizing (for the platform's TPM limits):
        WordPiece tokens cover at least one character each, plus two special tokens; no
        input is read past max_tokens."""
        def bound(text) -> int:
            if isinstance(text, str):
                return min(len(text) + 2, self.max_tokens)
            if isinstance(text, list):  # token ids
                return min(len(text) + 2, self.max_tokens)
            return 0

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
