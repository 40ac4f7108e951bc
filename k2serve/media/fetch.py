"""Fetch the bytes a media URL names, under a MediaPolicy.

`data:` URLs decode in place. An http(s) URL is fetched only when the policy enables http,
for an allow-listed host whose resolved address is public (or in the policy's allowed
networks); the connection goes to that vetted address (the Host header and TLS SNI keep the
name), so a second DNS answer cannot redirect it (DNS rebinding). Redirects are followed by
hand, to the same host only, each hop vetted again; no proxy from the environment is used;
the body is streamed and abandoned at the size cap; the whole fetch has one deadline."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx

from k2serve.errors import APIError
from k2serve.media.addresses import address_allowed, resolve
from k2serve.media.policy import MediaPolicy

CODE = "invalid_media_url"
HTTP_DISABLED = ("http(s) media URLs are disabled on this server: send the media inline as a "
                 "base64 data: URL, or ask the operator to enable --media-http with "
                 "--media-allowed-domains")


@dataclass(frozen=True)
class FetchedMedia:
    data: bytes
    content_type: str  # lowercased, without parameters ("image/png")
    url: str  # where it came from: the last URL after redirects, or "data:"


def refuse(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=CODE)


def shown(url: str) -> str:
    """A URL as error messages quote it (a data: URL can be megabytes long)."""
    return url if len(url) <= 100 else url[:97] + "..."


def accepts(content_type: str, accept: Collection[str]) -> bool:
    major = content_type.split("/")[0]
    return content_type in accept or f"{major}/*" in accept


async def fetch_bytes(url: str, policy: MediaPolicy, *, accept: Collection[str],
                      param: str | None = None) -> FetchedMedia:
    """The media `url` names, of one of the `accept`ed content types ("image/png",
    "image/*"). Raises APIError(400, code "invalid_media_url") saying why when refused."""
    if not isinstance(url, str) or not url.strip():
        raise refuse("The media URL is empty.", param)
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy, accept, param)
    if scheme not in ("http", "https"):
        raise refuse(f"Unsupported media URL scheme {scheme + ':' if scheme else '(none)'}: "
                     f"use a data: URL{' or http(s)' if policy.allow_http else ''}.", param)
    if not policy.allow_http:
        raise refuse(HTTP_DISABLED + ".", param)
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch_http(url, policy, accept, param)
    except TimeoutError:
        raise refuse(f"Fetching {shown(url)} took longer than the server's limit of "
                     f"{policy.timeout_s:g} s.", param) from None


def decode_data_url(url: str, policy: MediaPolicy, accept: Collection[str],
                    param: str | None) -> FetchedMedia:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise refuse("Malformed data: URL: expected data:<type>;base64,<data>.", param)
    fields = [f.strip().lower() for f in header.split(";")]
    content_type = fields[0] or "text/plain"
    if not accepts(content_type, accept):
        raise refuse(f"Unsupported media type {content_type!r} in data: URL; accepted: "
                     f"{', '.join(sorted(accept))}.", param)
    if "base64" in fields[1:]:
        # checked before decoding: base64 is 4 characters per 3 bytes
        if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 4:
            raise _too_large(policy, param)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise refuse("The data: URL's payload is not valid base64.", param) from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise _too_large(policy, param)
    return FetchedMedia(data, content_type, "data:")


def _too_large(policy: MediaPolicy, param: str | None) -> APIError:
    return refuse(f"The media is larger than the server's limit of {policy.max_bytes} bytes.",
                  param)


def check_url(url: httpx.URL, policy: MediaPolicy, param: str | None) -> str:
    """The URL's host (ASCII, lowercased) if the policy lets it be fetched."""
    if url.scheme not in ("http", "https"):
        raise refuse(f"Unsupported media URL scheme {url.scheme}:.", param)
    if url.userinfo:
        raise refuse("Media URLs with credentials (user:password@) are not fetched.", param)
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise refuse("The media URL has no host.", param)
    if not policy.host_allowed(host):
        raise refuse(f"The host {host!r} is not on this server's media allow-list "
                     f"(--media-allowed-domains).", param)
    return host


async def vetted_address(host: str, port: int, policy: MediaPolicy, param: str | None) -> str:
    """The address to connect to: every address the name resolves to must be allowed (a
    name with one private address among public ones is refused: the client cannot say
    which one a later lookup would pick)."""
    try:
        addresses = await resolve(host, port, policy)
    except OSError:
        raise refuse(f"The media host {host!r} could not be resolved.", param) from None
    if not addresses:
        raise refuse(f"The media host {host!r} could not be resolved.", param)
    for address in addresses:
        if not address_allowed(address, policy):
            raise refuse(f"The media host {host!r} resolves to {address}, a private, loopback, "
                         f"link-local or otherwise non-public address; it is not fetched.",
                         param)
    return str(addresses[0])


async def _fetch_http(url: str, policy: MediaPolicy, accept: Collection[str],
                      param: str | None) -> FetchedMedia:
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise refuse(f"Invalid media URL: {exc}.", param) from None
    # trust_env=False: an HTTP(S)_PROXY from the environment would connect by name, not to
    # the vetted address
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                 timeout=policy.timeout_s) as client:
        for _hop in range(policy.max_redirects + 1):
            host = check_url(current, policy, param)
            address = await vetted_address(host, current.port or _default_port(current),
                                           policy, param)
            request = client.build_request(
                "GET", current.copy_with(host=address),
                headers={"Host": current.netloc.decode("ascii"),
                         "Accept": ", ".join(sorted(accept)),
                         # a compressed body could expand past the cap inside one chunk
                         "Accept-Encoding": "identity",
                         "User-Agent": "k2serve-media-fetch"},
                extensions={"sni_hostname": host} if current.scheme == "https" else {})
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise refuse(f"Fetching {shown(str(current))} failed: "
                             f"{type(exc).__name__}.", param) from None
            try:
                if response.is_redirect:
                    current = _redirect_target(current, response, param)
                    continue
                return await _read_body(current, response, policy, accept, param)
            finally:
                await response.aclose()
    raise refuse(f"Fetching {shown(url)} was redirected more than {policy.max_redirects} "
                 f"times.", param)


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _redirect_target(current: httpx.URL, response: httpx.Response,
                     param: str | None) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise refuse(f"{shown(str(current))} answered a redirect without a Location.", param)
    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError):
        raise refuse(f"{shown(str(current))} redirected to an invalid URL.", param) from None
    if target.raw_host.lower() != current.raw_host.lower():
        raise refuse(f"{shown(str(current))} redirected to another host "
                     f"({target.raw_host.decode('ascii')}); only redirects to the same host "
                     f"are followed.", param)
    if current.scheme == "https" and target.scheme != "https":
        raise refuse(f"{shown(str(current))} redirected from https to {target.scheme}.", param)
    return target


async def _read_body(url: httpx.URL, response: httpx.Response, policy: MediaPolicy,
                     accept: Collection[str], param: str | None) -> FetchedMedia:
    where = shown(str(url))
    if response.status_code != 200:
        raise refuse(f"{where} answered HTTP {response.status_code}.", param)
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type:
        raise refuse(f"{where} answered without a Content-Type.", param)
    if not accepts(content_type, accept):
        raise refuse(f"{where} is {content_type!r}; accepted: {', '.join(sorted(accept))}.",
                     param)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise refuse(f"{where} answered with Content-Encoding {encoding!r}; only unencoded "
                     f"bodies are accepted.", param)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(policy, param)
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(policy, param)  # stop reading: the rest is never fetched
    except httpx.HTTPError as exc:
        raise refuse(f"Reading {where} failed: {type(exc).__name__}.", param) from None
    return FetchedMedia(bytes(body), content_type, str(url))
