"""Lines of a server-sent event stream, as the SSE standard ends them.

httpx's `aiter_lines()` splits with `str.splitlines()`, which also ends a line at U+2028,
U+2029, U+0085 and a few control characters. JSON encoders that write UTF-8 (vLLM's, most
servers') leave those raw inside strings, so a model that writes one would have its `data:`
line cut in two and its JSON unreadable. The standard ends lines at CRLF, LF or CR only.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx

_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    pending = ""
    async for text in response.aiter_text():
        pending += text
        # a CR that ends the chunk may be the first half of a CRLF: keep it for the next one
        held = 1 if pending.endswith("\r") else 0
        *lines, rest = _LINE_END.split(pending[:len(pending) - held])
        for line in lines:
            yield line
        pending = rest + pending[len(pending) - held:]
    *lines, rest = _LINE_END.split(pending)
    for line in lines:
        yield line
    if rest:
        yield rest
