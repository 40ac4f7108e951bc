"""Which IP addresses a media fetch may connect to: public ones, plus the operator's
allowed networks. Checked on the resolved address, so a public name that points at
127.0.0.1, 10.x or the cloud metadata address (169.254.169.254) is refused."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from k2serve.media.policy import MediaPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, NAT64, 6to4): it is
    where the packets end up, so it is what must be checked."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return None


def is_public(address: IPAddress) -> bool:
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_public(inner)
    return address.is_global and not (address.is_multicast or address.is_reserved
                                       or address.is_unspecified or address.is_loopback
                                       or address.is_link_local or address.is_private)


def address_allowed(address: IPAddress, policy: MediaPolicy) -> bool:
    if is_public(address):
        return True
    candidates = [address] + ([inner] if (inner := embedded_ipv4(address)) else [])
    return any(a in net for net in policy.networks() for a in candidates
               if a.version == net.version)


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def resolve(host: str, port: int, policy: MediaPolicy) -> list[IPAddress]:
    """The addresses of `host` (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    resolver = policy.resolver or system_resolve
    found = await resolver(host, port)
    # scoped IPv6 (fe80::1%eth0) parses after the zone is dropped; it is link-local anyway
    return [ipaddress.ip_address(str(a).split("%")[0]) for a in found]
