"""Local HTTP servers for the media-fetch tests (loopback only) and tiny image builders."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(size=(4, 3), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int, height: int, *, full: bool = True) -> bytes:
    """A greyscale PNG of `width` x `height` zero pixels: a small file that decodes to
    width*height bytes. `full=False` stops the IDAT early (only the header is real)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    parts = []
    for _ in range(height if full else 1):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


class MediaServer:
    """A threaded HTTP server on `host`, port 0 (or the given one), serving `routes`:
    path -> callable(handler). Records every request (path, Host header) in `hits`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, routes=None):
        self.hits: list[tuple[str, str]] = []
        self.sent = 0  # body bytes written by streaming routes
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits.append((self.path, self.headers.get("Host", "")))
                route = (server.routes or {}).get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    route(self, server)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.routes = routes or {}
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(body: bytes, content_type: str = "image/png", status: int = 200, headers=None):
    def route(handler, server):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(location: str):
    return reply(b"", "text/plain", 302, {"Location": location})


def endless(chunk_size: int = 64 * 1024, total: int = 256 * 1024 * 1024):
    """An image/png body with no Content-Length that goes on for `total` bytes."""
    def route(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b"\0" * chunk_size
        while server.sent < total:
            handler.wfile.write(chunk)
            server.sent += len(chunk)
    return route


def slow(delay_s: float):
    def route(handler, server):
        time.sleep(delay_s)
        reply(png_bytes())(handler, server)
    return route
