"""Kimi K2's tokenizer: tiktoken BPE over `tiktoken.model`, behind `TokenizerBase`.

K2 ships no `tokenizer.json`; its `tokenization_kimi.py` builds a `tiktoken.Encoding` from the BPE
ranks in `tiktoken.model`, K2's own split pattern, and 256 reserved special ids right after the
ranks. This module does the same, so ids match the reference tokenizer, and adds what the server
needs (token strings and bytes, K2's end of turn, the packaged chat template).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from importlib import resources

import tiktoken

from .byte_level import spell_bytes
from .tokenizer_base import CheckpointTokenizerFiles, TokenizerBase

# tokenization_kimi.py's pat_str. `&&` is character-class intersection: tiktoken's Rust regex
# supports it; Python's `regex` module only in V1 mode (V0 silently mis-splits).
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL_TOKENS = 256

# K2's named special tokens as (offset after the BPE ranks, text, special). Used when a
# tokenizer_config.json has no added_tokens_decoder. The five tool-call tokens are not "special":
# decode(skip_special_tokens=True) keeps them, so tool-call parsers see them in the text.
K2_NAMED_SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (0, "[BOS]", True), (1, "[EOS]", True), (2, "<|im_end|>", True), (3, "<|im_user|>", True),
    (4, "<|im_assistant|>", True), (6, "<|start_header_id|>", True), (7, "<|end_header_id|>", True),
    (9, "[EOT]", True), (10, "<|im_system|>", True),
    (11, "<|tool_calls_section_begin|>", False), (12, "<|tool_calls_section_end|>", False),
    (13, "<|tool_call_begin|>", False), (14, "<|tool_call_argument_begin|>", False),
    (15, "<|tool_call_end|>", False), (17, "<|im_middle|>", True),
    (254, "[UNK]", True), (255, "[PAD]", True),
)
# K2 ends an assistant turn with <|im_end|> (generation_config's eos); [EOS] stops too.
K2_END_OF_TURN = "<|im_end|>"

# tokenization_kimi.py encodes at most 400k characters per tiktoken call, and cuts runs of
# whitespace / non-whitespace longer than 25k (tiktoken issue #195: its regex can blow the stack).
# The cuts change token boundaries, so they are reproduced exactly.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # `\s` here is exactly str.isspace(), which the reference uses


class K2Tokenizer(TokenizerBase):
    """Encode/decode with K2's tiktoken vocabulary. Its added tokens are the 256 reserved ids
    after the BPE ranks."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[int, tuple[str, bool]],
        *,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        unk_token: str | None = "[UNK]",
        pad_token: str | None = "[PAD]",
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
        name_or_path: str | None = None,
    ):
        """`special_tokens`: id -> (text, special) for every reserved id after the ranks; the
        named special tokens are given by text."""
        ids = {text: i for i, (text, _) in special_tokens.items()}
        super().__init__(
            special_tokens,
            bos_token_id=ids.get(bos_token), eos_token_id=ids.get(eos_token),
            unk_token_id=ids.get(unk_token), pad_token_id=ids.get(pad_token),
            extra_eos_token_ids=extra_eos_token_ids,
            chat_template=chat_template, chat_templates=chat_templates, name_or_path=name_or_path,
        )
        self.encoding = tiktoken.Encoding(
            name="kimi_k2", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
            special_tokens=self.added_token_ids,
        )
        self.num_base_tokens = len(mergeable_ranks)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained_dir(cls, directory: str) -> K2Tokenizer:
        """Build from a K2 checkpoint directory: `tiktoken.model`, `tokenizer_config.json`,
        optional `chat_template.jinja` / `generation_config.json`."""
        ranks = read_tiktoken_bpe(os.path.join(directory, "tiktoken.model"))
        files = CheckpointTokenizerFiles.read(directory)
        specials = reserved_special_tokens(len(ranks), files.config.get("added_tokens_decoder"))
        templates = files.chat_templates

        def name(key: str, default: str) -> str:
            return files.named_token(key) or default

        return cls(
            ranks, specials,
            bos_token=name("bos_token", "[BOS]"), eos_token=name("eos_token", "[EOS]"),
            unk_token=name("unk_token", "[UNK]"), pad_token=name("pad_token", "[PAD]"),
            extra_eos_token_ids=files.eos_token_ids,
            chat_template=templates.pop("default", None) or packaged_k2_chat_template(),
            chat_templates=templates,
            name_or_path=directory,
        )

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *,
               allow_special_tokens: bool = True) -> list[int]:
        """See `TokenizerBase.encode`. Reserved-token text (e.g. "<|im_end|>") becomes its single
        id, as in tokenization_kimi.py; `allow_special_tokens=False` encodes every reserved
        token's text as plain text. K2 adds no BOS/EOS, so `add_special_tokens` changes nothing."""
        kwargs = {"allowed_special": "all"} if allow_special_tokens else {"disallowed_special": ()}
        ids: list[int] = []
        for piece in _encode_pieces(text):
            ids.extend(self.encoding.encode(piece, **kwargs))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 character becomes U+FFFD. Unknown ids show nothing."""
        n, special = self.vocab_size, self.special_ids
        keep = [int(i) for i in ids if 0 <= i < n and not (skip_special_tokens and i in special)]
        return self.encoding.decode(keep)

    def id_to_token(self, token_id: int) -> str | None:
        """The Hugging Face token string: byte-level spelling for BPE tokens, a special's name."""
        token_id = int(token_id)
        if token_id in self.added_tokens:
            return self.added_tokens[token_id][0]
        if 0 <= token_id < self.num_base_tokens:
            return spell_bytes(self.encoding.decode_single_token_bytes(token_id))
        return None

    def token_to_id(self, token: str) -> int | None:
        return self._token_ids.get(token)

    @cached_property
    def _token_ids(self) -> dict[str, int]:
        # Built on first use: spelling 160k tokens takes a noticeable fraction of a second.
        token = self.encoding.decode_single_token_bytes
        ids = {spell_bytes(token(i)): i for i in range(self.num_base_tokens)}
        ids.update(self.added_token_ids)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """See `TokenizerBase.token_bytes`; a reserved token's bytes are its text."""
        try:
            return self.encoding.decode_single_token_bytes(int(token_id))
        except (KeyError, OverflowError, ValueError):
            return b""

    # ---- model facts: where K2 differs --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    end_of_turn_tokens = frozenset({K2_END_OF_TURN})  # K2's own, not llama.cpp's list

    @cached_property
    def control_tokens(self) -> frozenset[str]:
        """Texts a user must not be able to type as tokens: all 256 reserved ones, the tool-call
        markers included."""
        return frozenset(self.added_token_ids)


def read_tiktoken_bpe(path: str) -> dict[bytes, int]:
    """`base64(token) rank` lines -> {token bytes: rank}, checking the ranks are 0..n-1.

    Not `tiktoken.load.load_tiktoken_bpe`: it caches by path in a temp directory, so a file
    rewritten at the same path would be read stale.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a 'base64-token rank' line: {line[:80]!r}"
                                 ) from e
    # The special ids start at len(ranks); gaps or duplicates would make ids collide.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def reserved_special_tokens(num_base_tokens: int, added_tokens_decoder: dict | None
                            ) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) for the 256 reserved ids, named as tokenization_kimi.py names them:
    from added_tokens_decoder, else `<|reserved_token_{id}|>`. Without an added_tokens_decoder,
    K2's own names are used. Unnamed reserved ids count as special (never shown in text)."""
    if added_tokens_decoder:
        named = {int(i): (e["content"], bool(e.get("special", True)))
                 for i, e in added_tokens_decoder.items()
                 if isinstance(e, dict) and e.get("content")}
    else:
        named = {num_base_tokens + off: (text, special)
                 for off, text, special in K2_NAMED_SPECIAL_TOKENS}
    ids = range(num_base_tokens, num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)
    return {i: named.get(i, (f"<|reserved_token_{i}|>", True)) for i in ids}


def packaged_k2_chat_template(thinking: bool = False) -> str:
    """The reconstructed K2 template shipped with k2serve (for checkpoints that carry none);
    `thinking`: K2-Thinking's (for the tiny K2-Thinking checkpoint)."""
    name = "kimi_k2_thinking.jinja" if thinking else "kimi_k2.jinja"
    return resources.files(__package__).joinpath(f"templates/{name}").read_text("utf-8")


def _encode_pieces(text: str) -> Iterator[str]:
    """The substrings tokenization_kimi.py hands to tiktoken, one call each."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start:start + _MAX_ENCODE_CHARS]
        if len(chunk) <= _MAX_RUN_CHARS:  # no run can be too long: skip the scan
            yield chunk
            continue
        # A run longer than the limit is cut every _MAX_RUN_CHARS characters from its start.
        cut = 0
        for m in _RUNS.finditer(chunk):
            for at in range(m.start() + _MAX_RUN_CHARS, m.end(), _MAX_RUN_CHARS):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]
