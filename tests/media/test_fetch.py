"""k2serve.media: each refusal of the media fetcher, proven against local servers on
loopback (a fake resolver stands in for DNS, so no real name is ever looked up)."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from PIL import Image, ImageFile

from k2serve.errors import APIError
from k2serve.media import MediaPolicy, fetch_bytes, fetch_image
from tests.media.servers import (
    MediaServer,
    bomb_png,
    endless,
    png_bytes,
    redirect,
    reply,
    slow,
)

PNG = png_bytes((5, 4), (10, 200, 30))


class FakeDNS:
    """host -> a list of answers, one per lookup (the last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]):
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        replies = self.answers[host]
        return replies[min(len(self.lookups_of(host)) - 1, len(replies) - 1)]

    def lookups_of(self, host):
        return [h for h in self.lookups if h == host]


def policy(dns=None, **fields) -> MediaPolicy:
    fields.setdefault("allow_http", True)
    fields.setdefault("allowed_domains", ("img.test", "other.test"))
    return MediaPolicy(resolver=dns or FakeDNS({"img.test": [["127.0.0.1"]],
                                                "other.test": [["127.0.0.1"]]}), **fields)


LOOPBACK_OK = ("127.0.0.1/32",)  # the test-only permit: the default refuses loopback


def refused(coro) -> APIError:
    with pytest.raises(APIError) as caught:
        asyncio.run(coro)
    assert caught.value.status == 400
    return caught.value


@pytest.fixture
def server():
    with MediaServer(routes={"/cat.png": reply(PNG)}) as running:
        yield running


def data_url(body: bytes, content_type="image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(body).decode()}"


# data: URLs ------------------------------------------------------------------------------

def test_a_data_url_decodes_under_the_default_policy():
    image = asyncio.run(fetch_image(data_url(PNG), MediaPolicy()))
    assert image.size == (5, 4) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,@@not-base64@@", "not valid base64"),
    ("data:text/html;base64,PGI+", "Unsupported media type 'text/html'"),
    ("data:image/png;base64", "Malformed data: URL"),
    ("file:///etc/passwd", "scheme file:"),
    ("ftp://img.test/cat.png", "scheme ftp:"),
    ("", "empty"),
])
def test_a_bad_data_url_or_scheme_is_refused(url, words):
    error = refused(fetch_bytes(url, MediaPolicy(), accept=("image/png",), param="p"))
    assert words in error.message and error.param == "p"


def test_an_oversized_data_url_is_refused_before_decoding():
    error = refused(fetch_bytes(data_url(b"\0" * 4096), MediaPolicy(max_bytes=1000),
                                accept=("image/png",)))
    assert "larger than the server's limit of 1000 bytes" in error.message


# http(s): the operator's switches -------------------------------------------------------------

def test_http_is_refused_unless_enabled(server):
    error = refused(fetch_bytes(f"http://127.0.0.1:{server.port}/cat.png", MediaPolicy(),
                                accept=("image/png",)))
    assert "disabled" in error.message and "--media-http" in error.message
    assert server.hits == []


def test_a_host_off_the_allow_list_is_refused(server):
    dns = FakeDNS({"evil.test": [["127.0.0.1"]]})
    error = refused(fetch_bytes(f"http://evil.test:{server.port}/cat.png",
                                policy(dns, allowed_networks=LOOPBACK_OK),
                                accept=("image/png",)))
    assert "'evil.test' is not on this server's media allow-list" in error.message
    assert server.hits == [] and dns.lookups == []


def test_an_allowed_host_is_fetched_by_its_vetted_address(server):
    image = asyncio.run(fetch_image(f"http://img.test:{server.port}/cat.png",
                                    policy(allowed_networks=LOOPBACK_OK)))
    assert image.getpixel((4, 3)) == (10, 200, 30)
    # the connection went to the address, the name travelled in the Host header
    assert server.hits == [("/cat.png", f"img.test:{server.port}")]


def test_wildcard_domains_match_subdomains_only():
    wild = MediaPolicy(allowed_domains=("*.img.test",))
    assert wild.host_allowed("a.img.test") and not wild.host_allowed("img.test")
    assert not wild.host_allowed("evilimg.test")
    assert MediaPolicy(allowed_domains=("*",)).host_allowed("anything.example")
    assert not MediaPolicy().host_allowed("img.test")


# addresses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.9",
                                     "::1", "::ffff:127.0.0.1", "fe80::1", "0.0.0.0",
                                     "64:ff9b::a9fe:a9fe"])
def test_a_name_resolving_to_a_non_public_address_is_refused(server, address):
    dns = FakeDNS({"img.test": [[address]]})
    error = refused(fetch_bytes(f"http://img.test:{server.port}/cat.png", policy(dns),
                                accept=("image/png",)))
    assert "non-public address" in error.message and server.hits == []


def test_one_private_address_among_public_ones_is_refused(server):
    dns = FakeDNS({"img.test": [["93.184.216.34", "127.0.0.1"]]})
    error = refused(fetch_bytes(f"http://img.test:{server.port}/cat.png", policy(dns),
                                accept=("image/png",)))
    assert "127.0.0.1" in error.message


def test_an_ip_literal_is_vetted_too(server):
    error = refused(fetch_bytes(f"http://127.0.0.1:{server.port}/cat.png",
                                policy(allowed_domains=("*",)), accept=("image/png",)))
    assert "non-public" in error.message and server.hits == []


def test_dns_rebinding_cannot_move_the_connection():
    """The first answer is the allowed address, every later one an internal host: the
    fetch connects to the first (no second lookup happens), and the next fetch, which sees
    the internal address, is refused."""
    inner_routes = {"/cat.png": reply(b"internal secret", "image/png")}
    with MediaServer("127.0.0.1", routes={"/cat.png": reply(PNG)}) as vetted, \
            MediaServer("127.0.0.2", vetted.port, routes=inner_routes) as internal:
        dns = FakeDNS({"img.test": [["127.0.0.1"], ["127.0.0.2"]]})
        rules = policy(dns, allowed_networks=LOOPBACK_OK)
        media = asyncio.run(fetch_bytes(f"http://img.test:{vetted.port}/cat.png", rules,
                                        accept=("image/png",)))
        assert media.data == PNG and dns.lookups == ["img.test"]
        error = refused(fetch_bytes(f"http://img.test:{vetted.port}/cat.png", rules,
                                    accept=("image/png",)))
        assert "127.0.0.2" in error.message
        assert internal.hits == [] and len(vetted.hits) == 1


def test_proxy_variables_are_ignored(server, monkeypatch):
    """A proxy would connect by name (and could reach anything): it is not used."""
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    media = asyncio.run(fetch_bytes(f"http://img.test:{server.port}/cat.png",
                                    policy(allowed_networks=LOOPBACK_OK), accept=("image/*",)))
    assert media.data == PNG


# redirects -----------------------------------------------------------------------------------

def test_a_redirect_to_another_host_is_refused():
    with MediaServer() as running:
        running.routes.update({
            "/cat.png": reply(PNG),
            "/away": redirect(f"http://other.test:{running.port}/cat.png"),
            "/here": redirect("/cat.png"),
            "/loop": redirect("/loop")})
        rules = policy(allowed_networks=LOOPBACK_OK)
        error = refused(fetch_bytes(f"http://img.test:{running.port}/away", rules,
                                    accept=("image/png",)))
        assert "redirected to another host (other.test)" in error.message
        assert [path for path, _ in running.hits] == ["/away"]
        media = asyncio.run(fetch_bytes(f"http://img.test:{running.port}/here", rules,
                                        accept=("image/png",)))
        assert media.data == PNG and media.url.endswith("/cat.png")
        error = refused(fetch_bytes(f"http://img.test:{running.port}/loop", rules,
                                    accept=("image/png",)))
        assert "redirected more than 3 times" in error.message


# the body ------------------------------------------------------------------------------------

def test_an_endless_body_is_abandoned_at_the_cap():
    with MediaServer(routes={"/big.png": endless()}) as running:
        started = time.monotonic()
        error = refused(fetch_bytes(f"http://img.test:{running.port}/big.png",
                                    policy(allowed_networks=LOOPBACK_OK, max_bytes=1_000_000),
                                    accept=("image/png",)))
        assert "larger than the server's limit of 1000000 bytes" in error.message
        time.sleep(0.2)
        # the client stopped reading: the server got no further than its socket buffers
        assert running.sent < 32 * 1024 * 1024
        assert time.monotonic() - started < 5


def test_a_declared_oversize_body_is_refused_unread():
    def huge(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
    with MediaServer(routes={"/big.png": huge}) as running:
        error = refused(fetch_bytes(f"http://img.test:{running.port}/big.png",
                                    policy(allowed_networks=LOOPBACK_OK, max_bytes=1000),
                                    accept=("image/png",)))
        assert "larger than" in error.message


def test_a_slow_server_times_out():
    with MediaServer(routes={"/slow.png": slow(3.0)}) as running:
        started = time.monotonic()
        error = refused(fetch_bytes(f"http://img.test:{running.port}/slow.png",
                                    policy(allowed_networks=LOOPBACK_OK, timeout_s=0.5),
                                    accept=("image/png",)))
        assert "longer than the server's limit of 0.5 s" in error.message
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("route, words", [
    (reply(b"<html>", "text/html"), "is 'text/html'"),
    (reply(PNG, "image/png", 404), "answered HTTP 404"),
    (reply(PNG, "image/png", headers={"Content-Encoding": "gzip"}), "Content-Encoding 'gzip'"),
])
def test_a_wrong_reply_is_refused(route, words):
    with MediaServer(routes={"/x": route}) as running:
        error = refused(fetch_image(f"http://img.test:{running.port}/x",
                                    policy(allowed_networks=LOOPBACK_OK)))
        assert words in error.message


# images --------------------------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    bomb = bomb_png(8000, 8000)  # 64 M pixels in a file of tens of kilobytes
    assert len(bomb) < 200_000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with MediaServer(routes={"/bomb.png": reply(bomb)}) as running:
        error = refused(fetch_image(f"http://img.test:{running.port}/bomb.png",
                                    policy(allowed_networks=LOOPBACK_OK)))
    assert error.code == "invalid_image"
    assert "declares 8000x8000 pixels, more than the server's limit of 25000000" \
        in error.message


def test_a_huge_declared_size_is_refused_through_a_data_url():
    error = refused(fetch_image(data_url(bomb_png(100_000, 100_000, full=False)),
                                MediaPolicy()))
    assert "pixels" in error.message and error.code == "invalid_image"


def test_an_image_within_the_pixel_limit_decodes():
    image = asyncio.run(fetch_image(data_url(bomb_png(300, 200)), MediaPolicy(max_pixels=60_000)))
    assert image.size == (300, 200) and image.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("body", [b"not an image at all", PNG[:40]])
def test_garbage_or_truncated_images_are_refused(body):
    error = refused(fetch_image(data_url(body), MediaPolicy()))
    assert error.code == "invalid_image"


def test_only_web_formats_are_decoded():
    import io
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="TIFF")
    error = refused(fetch_image(data_url(buffer.getvalue()), MediaPolicy()))
    assert "could not be read" in error.message


# the operator's configuration --------------------------------------------------------------

def test_the_policy_reads_the_environment():
    rules = MediaPolicy.from_env({"K2SERVE_MEDIA_HTTP": "1",
                                  "K2SERVE_MEDIA_ALLOWED_DOMAINS": "a.test, *.b.test",
                                  "K2SERVE_MEDIA_MAX_BYTES": "1234",
                                  "K2SERVE_MEDIA_TIMEOUT_S": "2.5"}, max_pixels=99)
    assert rules.allow_http and rules.allowed_domains == ("a.test", "*.b.test")
    assert (rules.max_bytes, rules.timeout_s, rules.max_pixels) == (1234, 2.5, 99)
    default = MediaPolicy.from_env({})
    assert not default.allow_http and default.allowed_networks == ()
    with pytest.raises(ValueError):
        MediaPolicy(allowed_networks=("not-a-cidr",))
