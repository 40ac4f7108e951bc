"""Read the key/value metadata of a GGUF file, and nothing else.

`gguf.GGUFReader` parses the whole file, tensor table and every array element as its own numpy view,
which takes seconds for a 49k-token vocabulary. A tokenizer only needs the header, so this walks the
header once with `struct` and stops before the tensor table.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Container
from typing import Any

_MAGIC = b"GGUF"

# GGUF value types (gguf.GGUFValueType): fixed-size scalars, then string (8) and array (9).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_gguf_metadata(path: str, keys: Container[str] | None = None) -> dict[str, Any]:
    """`{key: value}` for the file's metadata; with `keys`, only those (others are skipped, not decoded).

    Strings become `str`, arrays become lists. Only little-endian files are read: that is what
    llama.cpp writes on every platform it ships for.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _Parser(buf, path).metadata(keys)


class _Parser:
    def __init__(self, buf, path: str):
        self.buf = buf
        self.path = path
        self.pos = 0

    def metadata(self, keys: Container[str] | None) -> dict[str, Any]:
        if self.buf[:4] != _MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (bad magic)")
        (version,) = self._unpack("I", 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {version} (or big-endian file)")
        self._unpack("Q", 8)  # tensor count: not needed here
        (kv_count,) = self._unpack("Q", 16)
        self.pos = 24
        out: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            (vtype,) = self._unpack("I")
            if keys is None or key in keys:
                out[key] = self._value(vtype)
            else:
                self._skip(vtype)
        return out

    def _unpack(self, fmt: str, at: int | None = None):
        size = struct.calcsize("<" + fmt)
        pos = self.pos if at is None else at
        vals = struct.unpack_from("<" + fmt, self.buf, pos)
        if at is None:
            self.pos += size
        return vals

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # Tokens are meant to be UTF-8; a broken one should not make the whole file unreadable.
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            (etype,) = self._unpack("I")
            (count,) = self._unpack("Q")
            if etype in _SCALAR:
                fmt = f"{count}{_SCALAR[etype]}"
                return list(self._unpack(fmt))
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")

    def _skip(self, vtype: int) -> None:
        if vtype in _SCALAR:
            self.pos += struct.calcsize("<" + _SCALAR[vtype])
        elif vtype == _STRING:
            (n,) = self._unpack("Q")
            self.pos += n
        elif vtype == _ARRAY:
            (etype,) = self._unpack("I")
            (count,) = self._unpack("Q")
            if etype in _SCALAR:
                self.pos += count * struct.calcsize("<" + _SCALAR[etype])
            else:
                for _ in range(count):
                    self._skip(etype)
        else:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")
