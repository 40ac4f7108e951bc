"""Kimi K2's tokenizer: tiktoken BPE over `tiktoken.model`, with the same interface as `Tokenizer`.

K2 ships no `tokenizer.json`; its `tokenization_kimi.py` builds a `tiktoken.Encoding` from the BPE
ranks in `tiktoken.model`, K2's own split pattern, and 256 reserved special ids right after the
ranks. This module does the same, so ids match the reference tokenizer, and adds what the server
needs (stop ids, token bytes, the chat template). `load_tokenizer` picks this class or the
`tokenizers`-based one from what a checkpoint directory holds.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property, lru_cache
from importlib import resources

import tiktoken

from .byte_level import spell_bytes
from .tokenizer import Tokenizer, _read_chat_templates, _read_json, _token_text

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
K2_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
    "[EOT]", "<|im_system|>", "<|im_middle|>",
)
# K2 ends an assistant turn with <|im_end|> (generation_config's eos); [EOS] stops too.
K2_END_OF_TURN = "<|im_end|>"

# tokenization_kimi.py encodes at most 400k characters per tiktoken call, and cuts runs of
# whitespace / non-whitespace longer than 25k (tiktoken issue #195: its regex can blow the stack).
# The cuts change token boundaries, so they are reproduced exactly.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # `\s` here is exactly str.isspace(), which the reference uses


class K2Tokenizer:
    """Encode/decode with K2's tiktoken vocabulary; same public interface as `Tokenizer`."""

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
        """`special_tokens`: id -> (text, special) for every reserved id after the ranks."""
        self._specials = dict(special_tokens)
        self._special_by_text = {text: i for i, (text, _) in self._specials.items()}
        self.encoding = tiktoken.Encoding(
            name="kimi_k2", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_by_text,
        )
        self.num_base_tokens = len(mergeable_ranks)
        self.bos_token_id = self._special_by_text.get(bos_token)
        self.eos_token_id = self._special_by_text.get(eos_token)
        self.unk_token_id = self._special_by_text.get(unk_token)
        self.pad_token_id = self._special_by_text.get(pad_token)
        self._extra_eos = {int(i) for i in extra_eos_token_ids}
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.name_or_path = name_or_path

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained_dir(cls, directory: str) -> K2Tokenizer:
        """Build from a K2 checkpoint directory: `tiktoken.model`, `tokenizer_config.json`,
        optional `chat_template.jinja` / `generation_config.json`."""
        ranks = read_tiktoken_bpe(os.path.join(directory, "tiktoken.model"))
        config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
        specials = reserved_special_tokens(len(ranks), config.get("added_tokens_decoder"))
        templates = _read_chat_templates(directory, config)
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])

        def name(key: str, default: str) -> str:
            return _token_text(config.get(key)) or default

        return cls(
            ranks, specials,
            bos_token=name("bos_token", "[BOS]"), eos_token=name("eos_token", "[EOS]"),
            unk_token=name("unk_token", "[UNK]"), pad_token=name("pad_token", "[PAD]"),
            extra_eos_token_ids=gen_eos,
            chat_template=templates.pop("default", None) or packaged_k2_chat_template(),
            chat_templates=templates,
            name_or_path=directory,
        )

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *,
               allow_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special-token text (e.g. "<|im_end|>") becomes its single id, as in
        tokenization_kimi.py; `allow_special_tokens=False` encodes it as plain text instead (for
        untrusted text). K2 adds no BOS/EOS, so `add_special_tokens` changes nothing."""
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
        if token_id in self._specials:
            return self._specials[token_id][0]
        if 0 <= token_id < self.num_base_tokens:
            return spell_bytes(self.encoding.decode_single_token_bytes(token_id))
        return None

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._token_ids.get(token)

    @cached_property
    def _token_ids(self) -> dict[str, int]:
        # Built on first use: spelling 160k tokens takes a noticeable fraction of a second.
        token = self.encoding.decode_single_token_bytes
        ids = {spell_bytes(token(i)): i for i in range(self.num_base_tokens)}
        ids.update(self._special_by_text)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (a special token's text), b"" if unknown.
        Concatenated, they are the bytes `decode(..., skip_special_tokens=False)` decodes."""
        try:
            return self.encoding.decode_single_token_bytes(int(token_id))
        except (KeyError, OverflowError, ValueError):
            return b""

    # ---- model facts --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def bos_token(self) -> str | None:
        return self._name(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._name(self.eos_token_id)

    @property
    def unk_token(self) -> str | None:
        return self._name(self.unk_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._name(self.pad_token_id)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids `decode(skip_special_tokens=True)` drops: every reserved id except the five
        tool-call tokens (and any other the config marks `"special": false`)."""
        return frozenset(i for i, (_, special) in self._specials.items() if special)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """eos ([EOS]), generation_config's eos ids, and <|im_end|>, which ends K2's turns."""
        ids = set(self._extra_eos)
        for i in (self.eos_token_id, self._special_by_text.get(K2_END_OF_TURN)):
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    @cached_property
    def control_tokens(self) -> frozenset[str]:
        """Texts a user must not be able to type as tokens: all 256 reserved ones, the tool-call
        markers included."""
        return frozenset(self._special_by_text)

    def _name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._specials[token_id][0]

    def __repr__(self) -> str:
        return f"K2Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str) -> K2Tokenizer | Tokenizer:
    """The tokenizer of a checkpoint directory: K2's tiktoken one if it has `tiktoken.model`,
    otherwise the Hugging Face `tokenizer.json` one."""
    if os.path.exists(os.path.join(directory, "tiktoken.model")):
        return K2Tokenizer.from_pretrained_dir(directory)
    return Tokenizer.from_pretrained_dir(directory)


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


def packaged_k2_chat_template() -> str:
    """The reconstructed K2 template shipped with k2serve (for checkpoints that carry none)."""
    return resources.files(__package__).joinpath("templates/kimi_k2.jinja").read_text("utf-8")


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


# ---- a tiny K2-format tokenizer for tests --------------------------------------------------------

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


def write_tiny_k2_tokenizer_files(directory: str) -> int:
    """Write a K2-format tokenizer (`tiktoken.model`, `tokenizer_config.json` with K2's special
    tokens, `chat_template.jinja`) into `directory`; returns the vocab size (ranks + 256)."""
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
        f.write(packaged_k2_chat_template())
    return n + NUM_RESERVED_SPECIAL_TOKENS
