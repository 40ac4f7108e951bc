"""The server's tokenizer: a `tokenizers.Tokenizer` plus the model facts generation needs.

Built either from a GGUF file's metadata or from a Hugging Face tokenizer directory, and meant to
give the same ids and text as `transformers.AutoTokenizer` on the same input.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from .byte_level import byte_level_token_bytes

# Token texts that end a turn or a generation, beyond the eos id. Taken from llama.cpp's
# end-of-generation list (llama-vocab.cpp), which picks them by name for the same reason we do:
# files often name only one eos while the chat template ends turns with another token.
END_OF_GENERATION_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>",
)

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    """Encode/decode text and know the model's special and stop tokens.

    Use `from_gguf` or `from_pretrained_dir`; the constructor takes an already built backend.
    """

    def __init__(
        self,
        backend: HFTokenizer,
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
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self._extra_eos = {int(i) for i in extra_eos_token_ids}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.name_or_path = name_or_path
        self._added = backend.get_added_tokens_decoder()  # id -> AddedToken

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Build from the tokenizer metadata of a GGUF file (no tensor data is read)."""
        from .gguf_metadata import read_gguf_metadata
        from .gguf_tokenizer import build_from_gguf_metadata

        meta = read_gguf_metadata(path)
        parts = build_from_gguf_metadata(meta)
        named = {
            name: meta[f"tokenizer.chat_template.{name}"]
            for name in meta.get("tokenizer.chat_templates", [])
            if f"tokenizer.chat_template.{name}" in meta
        }
        return cls(
            parts.backend,
            bos_token_id=parts.bos_token_id,
            eos_token_id=parts.eos_token_id,
            unk_token_id=parts.unk_token_id,
            pad_token_id=parts.pad_token_id,
            extra_eos_token_ids=[i for i in (parts.eot_token_id, parts.eom_token_id) if i is not None],
            chat_template=parts.chat_template,
            chat_templates=named,
            name_or_path=path,
        )

    @classmethod
    def from_pretrained_dir(cls, directory: str) -> Tokenizer:
        """Build from a Hugging Face tokenizer directory (`tokenizer.json` is required)."""
        backend = HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}

        # Older configs list added tokens here too; add any the tokenizer.json lacks.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if entry.get("content") and entry["content"] not in known:
                tok = AddedToken(entry["content"], normalized=entry.get("normalized", False),
                                 special=entry.get("special", False))
                (backend.add_special_tokens if tok.special else backend.add_tokens)([tok])

        def special(name: str) -> int | None:
            text = _token_text(config.get(name))
            if text is None:
                return None
            tid = backend.token_to_id(text)
            if tid is None:  # transformers adds a named special token the vocabulary lacks
                backend.add_special_tokens([AddedToken(text, normalized=False, special=True)])
                tid = backend.token_to_id(text)
            return tid

        templates = _read_chat_templates(directory, config)
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        # transformers ignores add_bos_token/add_eos_token when tokenizer.json exists: its
        # post-processor already says whether BOS/EOS are added, so we take it as is.
        return cls(
            backend,
            bos_token_id=special("bos_token"),
            eos_token_id=special("eos_token"),
            unk_token_id=special("unk_token"),
            pad_token_id=special("pad_token"),
            extra_eos_token_ids=gen_eos,
            chat_template=templates.pop("default", None),
            chat_templates=templates,
            name_or_path=directory,
        )

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *,
               allow_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. "<|im_start|>") become their
        single ids; with `allow_special_tokens=False` every control token's text (see
        `control_tokens`) is encoded as plain text instead, for text a user wrote.
        `add_special_tokens` adds what the tokenizer's post-processor adds (BOS, if the model asks
        for it); keep it False for rendered chat prompts, whose template writes BOS itself.
        """
        backend = self.backend if allow_special_tokens else self._plain_backend
        # encode_batch releases the GIL while it works (encode holds it: seconds for a 4 MB
        # prompt, during which no other thread, the event loop included, runs)
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (byte-level tokens are un-mapped), b"" if unknown.

        Concatenating them gives exactly the bytes that `decode(..., skip_special_tokens=False)`
        turns into text.
        """
        table = self._bytes_table
        return table[token_id] if 0 <= token_id < len(table) else b""

    @cached_property
    def control_tokens(self) -> frozenset[str]:
        """Texts of the added tokens a user must not be able to type: every added token (special
        or not: Qwen's `<tool_call>` is a non-special marker) except whitespace-only ones, which
        code models add for indentation and which carry no meaning beyond their text."""
        return frozenset(t.content for t in self._added.values() if t.content.strip())

    @cached_property
    def _plain_backend(self) -> HFTokenizer:
        # The same tokenizer with every control token marked special and special-token matching
        # off (`encode_special_tokens`, what transformers' split_special_tokens uses), so their
        # text is split and BPE-encoded like any other text. Marking matters: matching stays on
        # for non-special added tokens. (Dropping the tokens instead would renumber the added
        # tokens that lie outside the model's vocabulary.)
        data = json.loads(self.backend.to_str())
        for token in data.get("added_tokens") or []:
            if token["content"] in self.control_tokens:
                token["special"] = True
        plain = HFTokenizer.from_str(json.dumps(data))
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        dec = self.backend.decoder
        decoder = dec.__getstate__().decode("utf-8") if dec is not None else ""
        byte_level = '"ByteLevel"' in decoder
        byte_fallback = '"ByteFallback"' in decoder
        out = []
        for i in range(self.vocab_size):
            tok = self.backend.id_to_token(i)
            if tok is None:
                out.append(b"")
            elif byte_level:
                out.append(byte_level_token_bytes(tok))
            elif i in self._added:
                out.append(tok.encode("utf-8"))
            elif byte_fallback and (m := _SPM_BYTE.match(tok)):
                out.append(bytes([int(m.group(1), 16)]))
            else:  # SentencePiece spells spaces as "▁"
                out.append(tok.replace("\u2581", " ").encode("utf-8"))
        return out

    # ---- model facts --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may be
        padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

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
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens a chat template may use (bos_token, eos_token, ...)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens: the ones `decode(skip_special_tokens=True)` drops."""
        return frozenset(i for i, t in self._added.items() if t.special)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, the file's extra eos/eot ids, and any added token named
        like an end-of-turn token (see END_OF_GENERATION_TOKENS)."""
        ids = set(self._extra_eos)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        by_text = {t.content: i for i, t in self._added.items()}
        names = set(END_OF_GENERATION_TOKENS)
        if "<|return|>" in by_text and "<|call|>" in by_text:
            # gpt-oss (harmony) ends every message, not the turn, with <|end|>; llama.cpp drops it too.
            names.discard("<|end|>")
        ids.update(i for text, i in by_text.items() if text in names)
        return frozenset(ids)

    def _text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


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
    main = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(main):
        with open(main, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of a rendered chat prompt (no BOS added: templates write their own).

    A `ChatPrompt` (what `ChatTemplate.render` returns) knows which control-token texts came
    from the conversation: those are encoded as plain text, together with the text around
    them, and only the template's own control tokens become control ids. The text between two
    of the template's control tokens is encoded in one piece, so the ids are exactly those of
    a tokenizer that does not know the user's control-token texts. A plain `str` is trusted
    whole. Works with `Tokenizer` and `K2Tokenizer`.
    """
    segments = getattr(prompt, "segments", None)
    if segments is None:
        return tokenizer.encode(prompt, add_special_tokens=False)
    from .chat_template import _alternation

    control = _alternation(frozenset(tokenizer.control_tokens))
    ids: list[int] = []
    run: list[str] = []

    def flush() -> None:
        text = "".join(run)
        run.clear()
        if text:
            ids.extend(tokenizer.encode(text, add_special_tokens=False, allow_special_tokens=False))

    for text, plain in segments:
        if plain or control is None:
            run.append(text)
            continue
        pos = 0
        for m in control.finditer(text):
            run.append(text[pos:m.start()])
            flush()
            ids.append(tokenizer.token_to_id(m.group()))
            pos = m.end()
        run.append(text[pos:])
    flush()
    return ids
