"""k2serve.serving.sse: a stream's lines end at CRLF, LF or CR (the SSE standard), wherever the
network cuts the chunks, and nowhere else."""

from __future__ import annotations

import asyncio

import httpx

from k2serve.serving.sse import sse_lines

STREAM = "data: a\u2028b\u0085c\r\n\r\ndata: x\ry\n\ndata: \u00e9\u4e2d\rlast"
LINES = ["data: a\u2028b\u0085c", "", "data: x", "y", "", "data: \u00e9\u4e2d", "last"]


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def lines_of(chunks: list[bytes]) -> list[str]:
    async def collect():
        response = httpx.Response(200, stream=Chunks(chunks),
                                  headers={"content-type": "text/event-stream; charset=utf-8"})
        return [line async for line in sse_lines(response)]

    return asyncio.run(collect())


def test_lines_end_only_where_the_standard_says_wherever_the_chunks_are_cut():
    data = STREAM.encode()
    assert lines_of([data]) == LINES
    for cut in range(1, len(data)):  # CRLF and multi-byte characters split across chunks
        assert lines_of([data[:cut], data[cut:]]) == LINES, cut
    assert lines_of([bytes([b]) for b in data]) == LINES


def test_a_stream_ending_in_a_line_end_has_no_empty_last_line():
    assert lines_of([b"data: 1\r\n", b"\r"]) == ["data: 1", ""]
    assert lines_of([b"data: 1\n"]) == ["data: 1"]
    assert lines_of([]) == []
