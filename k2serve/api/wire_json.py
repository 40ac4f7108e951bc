"""JSON for line-based wire formats (SSE events, JSONL files): compact UTF-8 that no reader
splits in two.

JSON leaves U+0085, U+2028 and U+2029 raw inside strings, but Python's `str.splitlines()`
(and httpx's `iter_lines()`, which uses it) end a line at each: a client reading our stream or
batch output that way would get half an event whenever a model wrote one. Escaped as \\uXXXX
they decode to the same text.
"""

from __future__ import annotations

import json

_LINE_BREAKERS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028",
                                "\u2029": "\\u2029"})


def json_line(value) -> str:
    """`value` as compact JSON holding no character any line reader ends a line at."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKERS)
