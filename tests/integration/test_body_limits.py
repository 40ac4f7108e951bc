"""Request heads and bodies through uvicorn, as `k2serve serve` runs them: the API key is
checked before a byte of the body is read (a bad key gets 401 while its body is still
unsent), a body that is not all sent within the deadline gets 408, one over the size limit
413 — each in the API's error shape, and the connection closed after a 408/413; a connection
that stalls before its request head is complete is closed. Scripted model, raw sockets; the
last test runs the real `k2serve serve` with these flags."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from k2serve.api.http_protocol import h11_protocol
from k2serve.app import create_app
from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from k2serve.platform.service import Platform
from k2serve.serving.registry import ModelRegistry, ModelSpec
from tests.conftest import free_port, start_server, stop_server
from tests.platform.test_api import MODEL, PRICE, FakeBackend

BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 4096


def make_app(tmp_path, body_timeout_s=BODY_TIMEOUT_S):
    database = Database(f"sqlite:///{tmp_path / 'k2serve.db'}")
    _, key = KeyStore(database).create("k")
    registry = ModelRegistry()
    registry.register(ModelSpec(id=MODEL, type="chat", context_length=64, pricing=PRICE),
                      FakeBackend())
    app = create_app(registry, max_body_bytes=MAX_BODY_BYTES, body_timeout_s=body_timeout_s,
                     platform=Platform(database))
    return app, key, database


def serve_in_thread(app):
    """uvicorn in a thread, configured as `k2serve serve` configures it; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning",
                                           http=h11_protocol(HEADER_TIMEOUT_S)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    app, key, database = make_app(tmp_path_factory.mktemp("body-limits"))
    for port in serve_in_thread(app):
        yield port, key
    database.close()


def exchange(port: int, head: str, body: bytes = b"", wait: float = 6.0, check_closed=True):
    """Send a request head (and maybe part of its body), never the rest; read one response.
    Returns (seconds to the full response, status, error body, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        t0 = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed without a response: {data!r}"
            data += chunk
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(rest) < int(headers["content-length"]):
            rest += s.recv(65536)
        elapsed = time.monotonic() - t0
        closed = None
        if check_closed:
            s.settimeout(2.0)
            try:
                closed = s.recv(1) == b""
            except socket.timeout:
                closed = False
    return elapsed, int(lines[0].split()[1]), json.loads(rest), closed


def head(path: str, key: str | None, **headers: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def assert_error(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/admin/usage"])
def test_a_bad_key_is_refused_before_the_body_is_sent(live, path):
    """The body never comes; the 401 does, and before the body deadline (had the server
    waited for the body first, this would be a 408 after a second, or a hang)."""
    port, _ = live
    elapsed, status, body, _ = exchange(port, head(path, "k2s-000000000000-nope",
                                                   Content_Length="1000"), check_closed=False)
    assert status == 401, body
    assert body["error"]["code"] == "invalid_api_key"
    assert elapsed < BODY_TIMEOUT_S


def test_authentication_reads_no_body(tmp_path):
    """At the ASGI level: a request with a bad key gets its 401 without the server's
    `receive` being called once (no byte of its body read, not even buffered)."""
    app, _, database = make_app(tmp_path)
    calls, sent = [], []

    async def receive():
        calls.append(1)
        return {"type": "http.request", "body": b'{"model": "x"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"14"),
                         (b"authorization", b"Bearer k2s-000000000000-nope")]}
    asyncio.run(app(scope, receive, send))
    database.close()
    assert sent[0]["status"] == 401
    assert calls == []


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_a_stalled_body_gets_408_within_the_deadline(live, path):
    """Headers and part of a body, then nothing: 408 in the error shape about the deadline
    later, and the connection closed (a generation endpoint's body is read by the platform,
    any other by the body middleware)."""
    port, key = live
    elapsed, status, body, closed = exchange(port, head(path, key, Content_Length="1000"),
                                             b'{"model": "fake/k2", "prompt": "a')
    assert status == 408, body
    assert_error(body, "request_timeout")
    assert BODY_TIMEOUT_S * 0.8 <= elapsed < BODY_TIMEOUT_S + 3
    assert closed


def test_a_trickled_body_gets_408_at_the_total_deadline(live):
    """One byte at a time keeps each read short; the deadline is on the whole body."""
    port, key = live
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head("/v1/completions", key, Content_Length="1000").replace(
            "\n", "\r\n").encode() + b"\r\n")
        t0 = time.monotonic()
        data = b""
        s.settimeout(0.2)
        while b"\r\n\r\n" not in data and time.monotonic() - t0 < BODY_TIMEOUT_S + 5:
            s.sendall(b" ")
            try:
                data += s.recv(65536)
            except socket.timeout:
                pass
        assert data.startswith(b"HTTP/1.1 408"), data
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 3


def test_an_oversized_body_gets_413_before_it_is_sent(live):
    port, key = live
    elapsed, status, body, closed = exchange(
        port, head("/v1/completions", key, Content_Length=str(MAX_BODY_BYTES + 1)))
    assert status == 413, body
    assert_error(body, "request_too_large")
    assert str(MAX_BODY_BYTES) in body["error"]["message"]
    assert elapsed < BODY_TIMEOUT_S and closed


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_an_oversized_chunked_body_gets_413(live, path):
    port, key = live
    chunk = b"x" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    _, status, body, closed = exchange(port, head(path, key, Transfer_Encoding="chunked"),
                                       chunks)
    assert status == 413, body
    assert_error(body, "request_too_large")
    assert closed


def test_normal_requests_still_work(live):
    port, key = live
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        r = c.post("/v1/chat/completions", content=json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
             "max_tokens": 1}).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/images/generations", json={"model": MODEL, "prompt": "x"})
        assert r.status_code in (400, 404) and "error" in r.json()


def closed_within(port: int, sent: bytes, limit: float) -> float | None:
    """Seconds until the server closes a connection that sent `sent` and then stalled."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(sent)
        t0 = time.monotonic()
        try:
            while s.recv(65536):
                pass
        except socket.timeout:
            return None
        return time.monotonic() - t0


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                                  b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /he"])
def test_a_stalled_request_head_is_closed(live, sent):
    """Nothing, part of a head, or a second request's partial head after a first one (keep-
    alive): closed after the head deadline instead of held for ever."""
    port, _ = live
    elapsed = closed_within(port, sent, HEADER_TIMEOUT_S + 4)
    assert elapsed is not None and elapsed < HEADER_TIMEOUT_S + 3


def test_a_request_outlasts_the_head_deadline():
    """The head deadline ends when the head is in: a reply that takes longer still arrives,
    and a keep-alive connection carries a second request after it."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def slow(request):
        await asyncio.sleep(HEADER_TIMEOUT_S * 2)
        return PlainTextResponse("done")

    for port in serve_in_thread(Starlette(routes=[Route("/slow", slow)])):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/slow").text == "done"
            assert c.get("/slow").text == "done"


@pytest.fixture(scope="module")
def real_server():
    server = start_server("--body-timeout", str(BODY_TIMEOUT_S), "--header-timeout",
                          str(HEADER_TIMEOUT_S), "--max-body-bytes", str(MAX_BODY_BYTES),
                          "--threads", "1")
    yield server
    stop_server(server)


def test_k2serve_serve_runs_these_limits(real_server):
    """`k2serve serve` (open mode: loopback, no key): a DNS-rebinding Host and a cross-site
    Origin are refused, a stalled body is 408, an oversized one 413, a stalled head closed."""
    port = real_server.port
    with httpx.Client(base_url=real_server.root, timeout=30) as c:
        assert c.get("/admin/usage").status_code == 200
        r = c.get("/admin/usage", headers={"Host": "evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = c.post("/v1/completions", headers={"Origin": "http://evil.example"},
                   json={"model": real_server.model, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    elapsed, status, body, closed = exchange(port, head("/v1/completions", None,
                                                        Content_Length="1000"), b"{")
    assert status == 408 and elapsed < BODY_TIMEOUT_S + 3 and closed
    _, status, body, _ = exchange(port, head("/v1/completions", None,
                                             Content_Length=str(MAX_BODY_BYTES + 1)))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    elapsed = closed_within(port, b"GET /health HTTP/1.1\r\n", HEADER_TIMEOUT_S + 4)
    assert elapsed is not None and elapsed < HEADER_TIMEOUT_S + 3


def test_serve_flags():
    from k2serve.cli import build_parser

    args = build_parser().parse_args(["serve", "--body-timeout", "2.5", "--header-timeout",
                                      "4", "--keep-alive-timeout", "3"])
    assert (args.body_timeout, args.header_timeout, args.keep_alive_timeout) == (2.5, 4, 3)
    defaults = build_parser().parse_args(["serve"])
    assert defaults.body_timeout == defaults.header_timeout == 30.0
    assert defaults.max_body_bytes == 16 * 1024 * 1024
