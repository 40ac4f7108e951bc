"""What the CLI commands that talk to a running server share (`k2serve endpoints`,
`k2serve batch`): the server and key options, and one HTTP call that turns a failure into a
message on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import sys


def add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("K2SERVE_URL", "http://127.0.0.1:8000"),
                        help="the k2serve server (default: $K2SERVE_URL, else "
                             "http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("K2SERVE_API_KEY"),
                        help="an API key of that server (default: $K2SERVE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON")


def call_server(args, method: str, path: str, *, headers: dict | None = None,
                timeout: float = 60, **kwargs):
    """The server's reply (an httpx.Response); exits 2 when the server cannot be reached,
    1 on an error reply (its message on stderr)."""
    import httpx

    headers = dict(headers or {})
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    try:
        reply = httpx.request(method, args.url.rstrip("/") + path, headers=headers,
                              timeout=timeout, **kwargs)
    except httpx.HTTPError as exc:
        print(f"k2serve: cannot reach {args.url}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if reply.status_code >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:500]
        print(f"k2serve: {reply.status_code}: {message}", file=sys.stderr)
        raise SystemExit(1)
    return reply
