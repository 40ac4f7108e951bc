"""The server's tokenizer for Hugging Face `tokenizers` vocabularies: a `tokenizers.Tokenizer`
behind `TokenizerBase`.

Built either from a GGUF file's metadata or from a Hugging Face tokenizer directory, and meant to
give the same ids and text as `transformers.AutoTokenizer` on the same input.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from .byte_level import byte_level_token_bytes
from .tokenizer_base import CheckpointTokenizerFiles, TokenizerBase

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer(TokenizerBase):
    """A `tokenizers.Tokenizer` (`backend`) with the model's special and stop tokens.

    Use `from_gguf` or `from_pretrained_dir`; the constructor takes an already built backend and
    `TokenizerBase`'s keyword arguments (bos_token_id, chat_template, ...).
    """

    def __init__(self, backend: HFTokenizer, **model_facts: Any):
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        super().__init__({i: (t.content, t.special) for i, t in added.items()}, **model_facts)
        self.backend = backend

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
        files = CheckpointTokenizerFiles.read(directory)
        config = files.config

        # Older configs list added tokens here too; add any the tokenizer.json lacks.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if entry.get("content") and entry["content"] not in known:
                tok = AddedToken(entry["content"], normalized=entry.get("normalized", False),
                                 special=entry.get("special", False))
                (backend.add_special_tokens if tok.special else backend.add_tokens)([tok])

        def special(name: str) -> int | None:
            text = files.named_token(name)
            if text is None:
                return None
            tid = backend.token_to_id(text)
            if tid is None:  # transformers adds a named special token the vocabulary lacks
                backend.add_special_tokens([AddedToken(text, normalized=False, special=True)])
                tid = backend.token_to_id(text)
            return tid

        templates = files.chat_templates
        # transformers ignores add_bos_token/add_eos_token when tokenizer.json exists: its
        # post-processor already says whether BOS/EOS are added, so we take it as is.
        return cls(
            backend,
            bos_token_id=special("bos_token"),
            eos_token_id=special("eos_token"),
            unk_token_id=special("unk_token"),
            pad_token_id=special("pad_token"),
            extra_eos_token_ids=files.eos_token_ids,
            chat_template=templates.pop("default", None),
            chat_templates=templates,
            name_or_path=directory,
        )

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *,
               allow_special_tokens: bool = True) -> list[int]:
        """See `TokenizerBase.encode`. `add_special_tokens` adds what the tokenizer's
        post-processor adds (BOS, if the model asks for it); keep it False for rendered chat
        prompts, whose template writes BOS itself.
        """
        backend = self.backend if allow_special_tokens else self._plain_backend
        # encode_batch releases the GIL while it works (encode holds it: seconds for a 4 MB
        # prompt, during which no other thread, the event loop included, runs)
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """See `TokenizerBase.token_bytes`; byte-level and SentencePiece spellings are un-mapped."""
        table = self._bytes_table
        return table[token_id] if 0 <= token_id < len(table) else b""

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
            elif i in self.added_tokens:
                out.append(tok.encode("utf-8"))
            elif byte_fallback and (m := _SPM_BYTE.match(tok)):
                out.append(bytes([int(m.group(1), 16)]))
            else:  # SentencePiece spells spaces as "▁"
                out.append(tok.replace("\u2581", " ").encode("utf-8"))
        return out

    # ---- model facts --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def encode_prompt(tokenizer: TokenizerBase, prompt: str) -> list[int]:
    """Ids of a rendered chat prompt (no BOS added: templates write their own).

    A `ChatPrompt` (what `ChatTemplate.render` returns) knows which control-token texts came
    from the conversation: those are encoded as plain text, together with the text around
    them, and only the template's own control tokens become control ids. The text between two
    of the template's control tokens is encoded in one piece, so the ids are exactly those of
    a tokenizer that does not know the user's control-token texts. A plain `str` is trusted
    whole. Works with every `TokenizerBase`.
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
