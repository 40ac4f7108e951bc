"""What every server tokenizer is: text <-> ids plus the model's special, control and stop tokens.

`TokenizerBase` holds what all tokenizers share: the named special tokens (bos/eos/unk/pad), the
chat templates, which added tokens are special, which end a turn, and which a user must not be
able to type. A subclass supplies the vocabulary itself (encode, decode, token strings and bytes).
`CheckpointTokenizerFiles` reads the files a checkpoint directory keeps beside its vocabulary.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

# Token texts that end a turn or a generation, beyond the eos id. Taken from llama.cpp's
# end-of-generation list (llama-vocab.cpp), which picks them by name for the same reason we do:
# files often name only one eos while the chat template ends turns with another token.
END_OF_GENERATION_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>",
)


class TokenizerBase(ABC):
    """Encode/decode text and know the model's special and stop tokens.

    `added_tokens` maps the id of every added token (tokens matched whole in the text before
    BPE runs, such as "<|im_start|>") to `(text, special)`; special ones are those
    `decode(skip_special_tokens=True)` drops.
    """

    def __init__(
        self,
        added_tokens: dict[int, tuple[str, bool]],
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
        name_or_path: str | None = None,
    ):
        self.added_tokens = dict(added_tokens)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self._extra_eos = {int(i) for i in extra_eos_token_ids}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.name_or_path = name_or_path

    # ---- text <-> ids: what each vocabulary does its own way ----------------------------------

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False, *,
               allow_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. An added token's text becomes its single id; with
        `allow_special_tokens=False` every control token's text (see `control_tokens`) is
        encoded as plain text instead, for text a user wrote. `add_special_tokens` adds what the
        model adds around a text (BOS, if it asks for it)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, without the special tokens unless `skip_special_tokens` is False."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The Hugging Face token string of `token_id`, None if unknown."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a Hugging Face token string, None if unknown."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for, b"" if unknown. Concatenated, they are
        exactly the bytes `decode(..., skip_special_tokens=False)` turns into text."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may
        be padded larger)."""

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.id_to_token(i) for i in ids]

    # ---- special, control and stop tokens -----------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self._text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._text(self.eos_token_id)

    @property
    def unk_token(self) -> str | None:
        return self._text(self.unk_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._text(self.pad_token_id)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens a chat template may use (bos_token, eos_token, ...)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @cached_property
    def added_token_ids(self) -> dict[str, int]:
        """Added token text -> id (the last id, where two share a text)."""
        return {text: i for i, (text, _) in self.added_tokens.items()}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens: the ones `decode(skip_special_tokens=True)` drops."""
        return frozenset(i for i, (_, special) in self.added_tokens.items() if special)

    @cached_property
    def control_tokens(self) -> frozenset[str]:
        """Texts of the added tokens a user must not be able to type: every added token (special
        or not: Qwen's `<tool_call>` is a non-special marker) except whitespace-only ones, which
        code models add for indentation and which carry no meaning beyond their text."""
        return frozenset(text for text, _ in self.added_tokens.values() if text.strip())

    @property
    def end_of_turn_tokens(self) -> frozenset[str]:
        """Texts of the added tokens that end generation besides eos: llama.cpp's
        END_OF_GENERATION_TOKENS, less `<|end|>` for gpt-oss (harmony), which ends every
        message with it, not the turn (llama.cpp drops it too)."""
        names = set(END_OF_GENERATION_TOKENS)
        if "<|return|>" in self.added_token_ids and "<|call|>" in self.added_token_ids:
            names.discard("<|end|>")
        return frozenset(names)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, the checkpoint's extra eos ids, and the added tokens
        named in `end_of_turn_tokens`."""
        ids = set(self._extra_eos)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        names = self.end_of_turn_tokens
        ids.update(i for text, i in self.added_token_ids.items() if text in names)
        return frozenset(ids)

    def _text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.id_to_token(token_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size})"


@dataclass
class CheckpointTokenizerFiles:
    """What a Hugging Face checkpoint directory says about its tokenizer beside the vocabulary:
    `tokenizer_config.json`, the chat templates and `generation_config.json`'s eos ids."""

    config: dict[str, Any]  # tokenizer_config.json; {} when absent
    chat_templates: dict[str, str]  # {name: template}, "default" for the main one
    eos_token_ids: list[int]  # generation_config.json's eos_token_id, as a list

    @classmethod
    def read(cls, directory: str) -> CheckpointTokenizerFiles:
        config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
        templates = _read_chat_templates(directory, config)
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        eos = gen.get("eos_token_id")
        return cls(config, templates, [eos] if isinstance(eos, int) else list(eos or []))

    def named_token(self, name: str) -> str | None:
        """The text of the config's special token `name` ("bos_token", ...), written there as a
        string or as a serialized AddedToken dict."""
        value = self.config.get(name)
        if isinstance(value, dict):
            return value.get("content")
        return value if isinstance(value, str) else None


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_chat_templates(directory: str, config: dict) -> dict[str, str]:
    """{name: template}, "default" for the main one. Files win over tokenizer_config.json, as in
    transformers."""
    templates: dict[str, str] = {}
    entry = config.get("chat_template")
    if isinstance(entry, str):
        templates["default"] = entry
    elif isinstance(entry, list):  # [{"name": ..., "template": ...}, ...]
        templates.update({t["name"]: t["template"] for t in entry if "name" in t and "template" in t})
    extra_dir = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for fn in sorted(os.listdir(extra_dir)):
            if fn.endswith(".jinja"):
                with open(os.path.join(extra_dir, fn), encoding="utf-8") as f:
                    templates[fn[: -len(".jinja")]] = f.read()
    processor = _read_json(os.path.join(directory, "chat_template.json"))  # a processor's
    if isinstance(processor, dict) and isinstance(processor.get("chat_template"), str):
        templates["default"] = processor["chat_template"]
    main = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(main):
        with open(main, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates
