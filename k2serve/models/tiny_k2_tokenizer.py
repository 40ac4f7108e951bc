"""The tokenizer files of the tiny K2 checkpoint (`tiny_k2.py`), in K2's real layout.

`write_tiny_k2_tokenizer_files` writes `tiktoken.model`, `tokenizer_config.json` with K2's special
tokens and `chat_template.jinja`. Its vocabulary is a small byte-level BPE trained here,
deterministically, on a built-in text with K2's split pattern.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from functools import lru_cache

from k2serve.text.k2_tokenizer import (
    K2_NAMED_SPECIAL_TOKENS,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAT_STR,
    packaged_k2_chat_template,
)

# tokenizer_config.json's additional_special_tokens in K2's own files
K2_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
    "[EOT]", "<|im_system|>", "<|im_middle|>",
)

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. What's the weather in Beijing today? I'm not sure,
but they'll say it's sunny. Hello World! Kimi is an AI assistant created by Moonshot AI.
You are Kimi, an AI assistant created by Moonshot AI. Let me check the weather for you.
def get_weather(city: str, unit: str = "celsius") -> dict:
    \"\"\"Return the current weather for a city.\"\"\"
    if not city:
        raise ValueError("city is required")
    return {"city": city, "temperature": 21, "unit": unit}

for i in range(10):
    print(i, i * i)  # squares
{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
 "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}
Numbers: 2024, 3.14159, 1000000, 42. Café, naïve, résumé, Zürich, São Paulo, Ångström.
北京今天天气晴朗。你好，世界！我是月之暗面开发的人工智能助手。天气很好，我们去公园吧。
Здравствуйте, мир! Γειά σου κόσμε. こんにちは世界。 안녕하세요 emoji: 😀 🎉 👍 ✨
"""
_TINY_MERGES = 300
# K2-Thinking's thinking markers: added tokens, kept in text like the tool-call markers.
K2_THINKING_TOKENS = ((22, "<think>", False), (23, "</think>", False))


@lru_cache(maxsize=1)
def tiny_k2_ranks() -> dict[bytes, int]:
    """A small byte-level BPE vocabulary trained deterministically on a built-in text: the 256
    single bytes first (so any text encodes), then `_TINY_MERGES` merges."""
    import regex  # a tiktoken dependency

    pieces = Counter(regex.findall(PAT_STR, _TINY_CORPUS, flags=regex.V1))
    words: dict[tuple[bytes, ...], int] = {}
    for piece, count in pieces.items():
        key = tuple(bytes([b]) for b in piece.encode("utf-8"))
        words[key] = words.get(key, 0) + count
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(_TINY_MERGES):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: smallest bytes
        ranks.setdefault(a + b, len(ranks))
        merged: dict[tuple[bytes, ...], int] = {}
        for word, count in words.items():
            key = _merge_pair(word, a, b)
            merged[key] = merged.get(key, 0) + count
        words = merged
    return ranks


def _merge_pair(word: tuple[bytes, ...], a: bytes, b: bytes) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tiny_k2_tokenizer_files(directory: str, thinking: bool = False) -> int:
    """Write a K2-format tokenizer (`tiktoken.model`, `tokenizer_config.json` with K2's special
    tokens, `chat_template.jinja`) into `directory`; returns the vocab size (ranks + 256).
    `thinking`: K2-Thinking's (its `<think>` markers and template)."""
    ranks = tiny_k2_ranks()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tiktoken.model"), "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    n = len(ranks)
    config = {
        "added_tokens_decoder": {
            str(n + off): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": special}
            for off, text, special in K2_NAMED_SPECIAL_TOKENS
            + (K2_THINKING_TOKENS if thinking else ())
        },
        "additional_special_tokens": list(K2_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1e30,
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(packaged_k2_chat_template(thinking))
    return n + NUM_RESERVED_SPECIAL_TOKENS
