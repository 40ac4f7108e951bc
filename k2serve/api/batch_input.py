"""A batch input file's lines: checked at upload (the first bad line named in a 400) and
read again when a batch runs them.

A line is a JSON object: `custom_id` (a string, unique in the file), `body` (the request,
an object) and, as OpenAI requires, `method` ("POST") and `url` (an endpoint served here).
Together's lines may leave `method` and `url` out: the batch's `endpoint` is their url.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from k2serve.errors import bad_request

# The endpoints a batch line may call: this server's JSON generation routes.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                   "/v1/moderations", "/v1/rerank", "/v1/responses", "/v1/messages")
OPENAI_BATCH_PURPOSE = "batch"
BATCH_PURPOSES = frozenset({OPENAI_BATCH_PURPOSE, "batch-api"})
MAX_CUSTOM_ID = 512


@dataclass
class BatchLine:
    line_no: int  # 1-based line of the file
    custom_id: str
    url: str | None
    body: dict


def parse_lines(data: bytes, *, require_url: bool, param: str = "file") -> list[BatchLine]:
    """The file's request lines (blank lines skipped). Raises a 400 naming the first bad
    line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The file is not UTF-8 text (byte {exc.start}).", param=param,
                          code="invalid_file") from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue

        def bad(why: str):
            return bad_request(f"Line {number} of the file {why}", param=param,
                               code="invalid_batch_line")

        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad("is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise bad("is not a JSON object.")
        custom_id = doc.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise bad(f"needs a custom_id: a non-empty string of at most {MAX_CUSTOM_ID} "
                      f"characters.")
        if custom_id in seen:
            raise bad(f"repeats the custom_id {custom_id!r}: each line needs its own.")
        seen.add(custom_id)
        method, url = doc.get("method"), doc.get("url")
        if method is None and require_url:
            raise bad('needs "method": "POST".')
        if method is not None and method != "POST":
            raise bad(f'has method {str(method)[:16]!r}; batch requests are "POST".')
        if url is None and require_url:
            raise bad(f"needs a url, one of {', '.join(BATCH_ENDPOINTS)}.")
        if url is not None and url not in BATCH_ENDPOINTS:
            raise bad(f"has url {str(url)[:128]!r}, which a batch cannot call here; use one "
                      f"of {', '.join(BATCH_ENDPOINTS)}.")
        body = doc.get("body")
        if not isinstance(body, dict):
            raise bad("needs a body: the request, a JSON object.")
        if body.get("stream"):
            raise bad("asks for a stream; a batch line's reply is stored whole, so leave "
                      "stream out.")
        lines.append(BatchLine(number, custom_id, url, body))
    if not lines:
        raise bad_request("The file has no request lines.", param=param, code="invalid_file")
    return lines
