"""Who is calling: the request's API key, or open mode (loopback, no key made yet)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool

from k2serve.errors import APIError
from k2serve.platform.keys import KeyInfo, KeyStore


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _authority_host(authority: str) -> str:
    """The host of a Host header value: `localhost:8000` -> localhost, `[::1]:80` -> ::1."""
    authority = authority.strip()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    name, sep, port = authority.rpartition(":")
    return name if sep and ":" not in name and port.isdigit() else authority


def _origin_host(origin: str) -> str:
    try:  # `null` (a sandboxed frame, a file: page) has no host, so it is not loopback
        return urlsplit(origin.strip()).hostname or ""
    except ValueError:
        return ""


def check_open_mode_request(host: str | None, origin: str | None) -> None:
    """Open mode trusts the machine, not the network: a request must be addressed to a
    loopback name (a DNS-rebinding page reaches 127.0.0.1 under its own host name) and, when
    a browser sends one, come from a loopback Origin (a cross-site page can POST without
    reading the reply). Raises 403."""
    hint = "Create an API key (`k2serve keys create --name NAME`) to serve it with keys."
    if host is None or not is_loopback(_authority_host(host)):
        raise APIError(403, f"This server runs without API keys (open mode), so it answers only "
                            f"requests addressed to localhost, 127.0.0.1 or [::1], not to Host "
                            f"'{(host or '')[:100]}'. {hint}", code="host_not_allowed")
    if origin is not None and not is_loopback(_origin_host(origin)):
        raise APIError(403, f"This server runs without API keys (open mode), so it refuses "
                            f"browser requests from other sites (Origin '{origin[:100]}'). "
                            f"{hint}", code="origin_not_allowed")


class Authenticator:
    """Bearer keys, checked against the key store; open mode when the server listens on
    loopback and no key has been made."""

    def __init__(self, keys: KeyStore, host: str):
        self.keys = keys
        self.loopback = is_loopback(host)

    def open_mode(self) -> bool:
        return self.loopback and not self.keys.any_key_exists()

    def startup_note(self) -> str:
        if self.open_mode():
            return ("auth: OPEN — no API key exists and the server listens on loopback, so "
                    "requests need no key (`k2serve keys create --name NAME` turns keys on)")
        if not self.keys.any_key_exists():
            return ("auth: API key required — but no key exists yet, so every request will be "
                    "refused: create one with `k2serve keys create --name NAME`")
        return "auth: API key required"

    async def authenticate(self, authorization: str | None, host: str | None = None,
                           origin: str | None = None) -> KeyInfo | None:
        """The request's key; None in open mode, for a request with a loopback Host (and
        Origin, if any: check_open_mode_request). Raises 401, or 403 in open mode."""
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        info = await run_in_threadpool(self.keys.lookup, token) if token else None
        if info is not None and not info.revoked:
            return info
        if self.loopback and not await run_in_threadpool(self.keys.any_key_exists):
            check_open_mode_request(host, origin)
            return None  # open mode
        headers = {"www-authenticate": 'Bearer realm="k2serve"'}
        if info is not None:
            raise APIError(401, f"The API key '{info.prefix}' ({info.name}) has been revoked.",
                           code="invalid_api_key", headers=headers)
        if token is None:
            raise APIError(401, "Missing API key. Send it as 'Authorization: Bearer <key>' "
                                "(`k2serve keys create` makes one).",
                           code="missing_api_key", headers=headers)
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=headers)
