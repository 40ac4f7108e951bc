"""Build a `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata.

A GGUF carries no `tokenizer.json`, only llama.cpp's keys: the vocabulary, merges, token types and
a `tokenizer.ggml.pre` name for how text is split before BPE. We rebuild the HF tokenizer those
describe; the split regexes per `pre` name follow llama.cpp's `llama-vocab.cpp`, which is what the
GGUF's converter matched against the original `tokenizer.json`.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by Llama 3, Qwen, SmolLM, Kimi K2 ...)
is supported; SentencePiece vocabularies raise a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .byte_level import is_byte_level_spelled, spell_bytes

logger = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Stands for GPT-2's split, which `pre_tokenizers.ByteLevel(use_regex=True)` applies itself.
GPT2 = "<gpt2>"

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenization_kimi.py's tiktoken pattern: Han runs split off first, Han removed from the letter classes.
_KIMI_K2 = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `pre` name -> regexes applied one after another (each match kept as its own piece), as llama.cpp
# does. Names not listed fall back to GPT-2, as llama.cpp does.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str | None, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), (GPT2,)),
    # Digits one at a time, then GPT-2 (SmolLM's tokenizer.json: Digits(individual) + ByteLevel).
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"), (r"\p{N}", GPT2)
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
         "smaug-bpe"),
        (_LLAMA3,),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), (_QWEN2,)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O,)),
    "kimi-k2": (_KIMI_K2,),
}


@dataclass
class GGUFTokenizerParts:
    """What a GGUF says about its tokenizer, with the `tokenizers` object built from it."""

    backend: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    # llama.cpp's own end-of-turn ids, when the file names them
    eot_token_id: int | None = None
    eom_token_id: int | None = None


def pre_tokenizer_for(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for the `tokenizer.ggml.pre` name `pre`."""
    splits = PRE_TOKENIZER_SPLITS.get(pre or "default")
    if splits is None:
        logger.warning("GGUF pre-tokenizer %r is not known; splitting text like GPT-2", pre)
        splits = (GPT2,)
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits if rx != GPT2
    ]
    # The byte mapping always comes last; it also applies the GPT-2 regex when that is in the list.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=GPT2 in splits))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def build_from_gguf_metadata(meta: dict[str, Any]) -> GGUFTokenizerParts:
    """Build the tokenizer described by GGUF metadata (`read_gguf_metadata` output)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is. "
            "Load the tokenizer from the model's tokenizer.json instead."
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    # Control and user-defined tokens are stored as their raw text (llama.cpp prints them as is);
    # normal tokens are already in the byte alphabet. A normal token outside the alphabet is respelled,
    # as transformers does, so BPE can still produce it.
    vocab: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == TOKEN_NORMAL and not is_byte_level_spelled(tok):
            tok = spell_bytes(tok.encode("utf-8"))
        vocab.setdefault(tok, i)  # a duplicate spelling keeps its first id, like llama.cpp's token_to_id

    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizer_for(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()

    # Added tokens are matched whole in the input before BPE runs, so "<|im_start|>" stays one id.
    # Their content is already in `vocab`, so `tokenizers` keeps the file's ids for them.
    special = [AddedToken(t, normalized=False, special=True)
               for t, typ in zip(tokens, types) if typ == TOKEN_CONTROL and t and vocab.get(t) is not None]
    user = [AddedToken(t, normalized=False, special=False)
            for t, typ in zip(tokens, types) if typ == TOKEN_USER_DEFINED and t and vocab.get(t) is not None]
    backend.add_special_tokens(special)
    backend.add_tokens(user)

    def tid(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    # llama.cpp defaults add_bos to true only for SentencePiece vocabularies; for BPE the flag rules.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    backend.post_processor = _post_processor(tokens, bos if add_bos else None, eos if add_eos else None)
    # `tokenizer.ggml.add_space_prefix` only matters for SentencePiece; byte-level BPE ignores it.

    return GGUFTokenizerParts(
        backend=backend,
        bos_token_id=bos,
        eos_token_id=eos,
        unk_token_id=tid("unknown_token_id"),
        pad_token_id=tid("padding_token_id"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=meta.get("tokenizer.chat_template"),
        eot_token_id=tid("eot_token_id"),
        eom_token_id=tid("eom_token_id"),
    )


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> processors.PostProcessor:
    if bos is None and eos is None:
        # Adds nothing (trim_offsets=False); the same post-processor transformers gives GPT-2.
        return processors.ByteLevel(trim_offsets=False)
    single = " ".join(x for x in (bos is not None and f"{tokens[bos]}:0", "$A:0",
                                  eos is not None and f"{tokens[eos]}:0") if x)
    pair = single + " " + " ".join(x for x in (bos is not None and f"{tokens[bos]}:1", "$B:1",
                                               eos is not None and f"{tokens[eos]}:1") if x)
    specials = [(tokens[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
