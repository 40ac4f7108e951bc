"""GPT-2's byte-to-unicode alphabet, used by every byte-level BPE vocabulary.

Byte-level vocabularies spell each byte as one printable character (space -> "Ġ", newline -> "Ċ"),
so token strings in `tokenizer.json` and GGUF files are in this alphabet, not raw text.
"""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    # Printable Latin-1 bytes keep their own character; the other 68 are moved to U+0100 onwards.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def is_byte_level_spelled(token: str) -> bool:
    """Whether every character of `token` is in the byte alphabet."""
    return all(c in CHAR_TO_BYTE for c in token)


def byte_level_token_bytes(token: str) -> bytes:
    """The bytes a token stands for, the way the `tokenizers` ByteLevel decoder reads it.

    That decoder maps a token through the alphabet only when all its characters are in it; any
    other token (an added token such as "<think>\\n") is taken as its own UTF-8 text.
    """
    if is_byte_level_spelled(token):
        return bytes(CHAR_TO_BYTE[c] for c in token)
    return token.encode("utf-8")


def spell_bytes(data: bytes) -> str:
    """The byte-alphabet spelling of raw bytes."""
    return "".join(BYTE_TO_CHAR[b] for b in data)
