"""Open mode (loopback, no key made) trusts the machine, not the network: a request must be
addressed to a loopback Host, and a browser's Origin, when sent, must be loopback too.
Otherwise a DNS-rebinding page (Host: its own name, resolved to 127.0.0.1) or any cross-site
form POST drives the API and reads usage without a key."""

from __future__ import annotations

import pytest

from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows
from tests.platform.test_api import TestClient, completion, make_app


def assert_refused(r, code):
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "permission_error"
    assert "k2serve keys create" in error["message"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                                  "localhost.evil.example", "10.0.0.5:8000"])
def test_open_mode_refuses_other_host_names(database, host):
    app, platform = make_app(database)
    assert platform.open_mode()
    with TestClient(app) as c:
        assert_refused(c.get("/admin/usage", headers={"Host": host}), "host_not_allowed")
        r = completion(c, headers={"Host": host, "x-request-id": "rebound"})
        assert_refused(r, "host_not_allowed")
        assert c.get("/v1/models", headers={"Host": host}).status_code == 403
        assert c.get("/health", headers={"Host": host}).status_code == 200  # public, as ever
    assert all(not row.billed for row in ledger_rows(database))  # nothing generated


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1",
                                  "127.0.0.1:8000", "127.1.2.3:80", "[::1]", "[::1]:8000"])
def test_open_mode_answers_loopback_host_names(database, host):
    app, _ = make_app(database)
    with TestClient(app) as c:
        assert c.get("/admin/usage", headers={"Host": host}).status_code == 200
        assert completion(c, headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:443", "null",
                                    "file://", "http://127.0.0.1.nip.io:8000", "garbage"])
def test_open_mode_refuses_cross_site_browser_requests(database, origin):
    """A page on another site can send a form POST (no preflight) to 127.0.0.1 and the
    server would generate (and bill the operator); its Origin header gives it away."""
    app, _ = make_app(database)
    with TestClient(app) as c:
        r = completion(c, headers={"Origin": origin, "x-request-id": "cross-site"})
        assert_refused(r, "origin_not_allowed")
        assert_refused(c.get("/admin/usage", headers={"Origin": origin}), "origin_not_allowed")
    assert "cross-site" not in {row.request_id for row in ledger_rows(database)
                                if row.billed}


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8000",
                                    "http://[::1]:5173"])
def test_open_mode_answers_a_local_web_page(database, origin):
    """A web UI running on this machine (another loopback port) may use the open server."""
    app, _ = make_app(database)
    with TestClient(app) as c:
        assert completion(c, headers={"Origin": origin}).status_code == 200


def test_with_keys_the_key_decides_not_the_host(database):
    """Host/Origin checks are open mode's; with keys, a valid key is enough (a server behind
    a reverse proxy sees the proxy's Host) and a missing one is 401 whatever the Host."""
    _, key = KeyStore(database).create("k")
    app, platform = make_app(database)
    assert not platform.open_mode()
    with TestClient(app) as c:
        evil = {"Host": "api.example.com", "Origin": "https://app.example.com"}
        assert completion(c, key=key, headers=evil).status_code == 200
        r = completion(c, headers=evil)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_not_loopback_server_is_never_open_whatever_the_host(database):
    app, _ = make_app(database, host="0.0.0.0")
    with TestClient(app) as c:
        assert c.get("/admin/usage", headers={"Host": "localhost"}).status_code == 401
