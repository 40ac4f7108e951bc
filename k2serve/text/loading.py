"""Pick and build the tokenizer of a model path."""

from __future__ import annotations

import os

from .k2_tokenizer import K2Tokenizer
from .tokenizer import Tokenizer
from .tokenizer_base import TokenizerBase


def load_tokenizer(path: str) -> TokenizerBase:
    """The tokenizer of a model path: a `.gguf` file's metadata, K2's tiktoken one for a
    checkpoint directory with `tiktoken.model`, otherwise the directory's Hugging Face
    `tokenizer.json`."""
    if path.endswith(".gguf"):
        return Tokenizer.from_gguf(path)
    if os.path.exists(os.path.join(path, "tiktoken.model")):
        return K2Tokenizer.from_pretrained_dir(path)
    return Tokenizer.from_pretrained_dir(path)
