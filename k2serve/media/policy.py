"""What the operator lets requests fetch: schemes, hosts, networks and limits."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# host, port -> the addresses it resolves to (injectable so tests need no real DNS)
Resolver = Callable[[str, int], Awaitable[list[str]]]

ENV_PREFIX = "K2SERVE_MEDIA_"


@dataclass(frozen=True)
class MediaPolicy:
    """Defaults are the safe ones: `data:` URLs only.

    allow_http: fetch http(s) URLs at all (`--media-http` / K2SERVE_MEDIA_HTTP=1).
    allowed_domains: hosts http(s) URLs may name: "example.com" matches that host exactly,
        "*.example.com" its subdomains, "*" any host. Empty refuses every host.
    allowed_networks: CIDRs that may be connected to although they are not public (an
        internal image store, or loopback in tests). Public addresses are always allowed.
    max_bytes: the most bytes one media item may have (a data: URL's decoded payload too).
    timeout_s: the whole fetch (DNS, connect, redirects, body) must finish within this.
    max_pixels: the most pixels (width x height) an image may declare; checked from the
        header, before the pixels are decoded.
    max_redirects: redirects followed, each to the same host only.
    resolver: DNS lookup; None uses the system's.
    """

    allow_http: bool = False
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_pixels: int = 25_000_000
    max_redirects: int = 3
    resolver: Resolver | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "allowed_domains",
                           tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains
                                 if d.strip()))
        # parsed once here, so a bad CIDR fails at startup, not on a request
        for cidr in self.allowed_networks:
            ipaddress.ip_network(cidr, strict=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> MediaPolicy:
        """K2SERVE_MEDIA_HTTP=1, K2SERVE_MEDIA_ALLOWED_DOMAINS=a.com,*.b.org,
        K2SERVE_MEDIA_ALLOWED_NETWORKS=10.1.0.0/16, K2SERVE_MEDIA_MAX_BYTES,
        K2SERVE_MEDIA_TIMEOUT_S, K2SERVE_MEDIA_MAX_PIXELS, K2SERVE_MEDIA_MAX_REDIRECTS.
        Keyword overrides (e.g. from CLI flags) win over the environment."""
        env = os.environ if environ is None else environ

        def get(name):
            value = env.get(ENV_PREFIX + name)
            return value.strip() if value and value.strip() else None

        values: dict = {}
        if (flag := get("HTTP")) is not None:
            values["allow_http"] = flag.lower() in ("1", "true", "yes", "on")
        for name, key in (("ALLOWED_DOMAINS", "allowed_domains"),
                          ("ALLOWED_NETWORKS", "allowed_networks")):
            if (listed := get(name)) is not None:
                values[key] = tuple(p for p in listed.split(",") if p.strip())
        for name, key, kind in (("MAX_BYTES", "max_bytes", int), ("TIMEOUT_S", "timeout_s", float),
                                ("MAX_PIXELS", "max_pixels", int),
                                ("MAX_REDIRECTS", "max_redirects", int)):
            if (raw := get(name)) is not None:
                values[key] = kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for domain in self.allowed_domains:
            if domain == "*" or domain == host:
                return True
            if domain.startswith("*.") and host.endswith(domain[1:]):
                return True
        return False

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.allowed_networks]
