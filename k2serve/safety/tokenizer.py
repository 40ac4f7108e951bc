"""The Keras word tokenizer the classifier was trained with, re-implemented from its rules.

Keras `text_to_word_sequence`: lower-case, replace each filter character by the split
character, split on it, drop empty pieces. `texts_to_sequences` then keeps the words whose
index is below `num_words` and silently drops the others (the package has no OOV token).
"""

from __future__ import annotations

import json
from pathlib import Path


class WordTokenizer:
    def __init__(self, filters: str, lower: bool, split: str, words: list[str]):
        self._lower = lower
        self._split = split
        self._table = str.maketrans({c: split for c in filters})
        self._index = {word: i + 1 for i, word in enumerate(words)}  # 0 is padding

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        spec = json.loads(Path(path).read_text())
        return cls(spec["filters"], spec["lower"], spec["split"], spec["words"])

    @property
    def vocab_size(self) -> int:
        return len(self._index) + 1

    def words(self, text: str) -> list[str]:
        if self._lower:
            text = text.lower()
        return [w for w in text.translate(self._table).split(self._split) if w]

    def ids(self, words: list[str]) -> list[int]:
        index = self._index
        return [index[w] for w in words if w in index]
