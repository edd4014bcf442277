"""Where job status callbacks may go: ``MELTER_CALLBACK_ALLOW`` (host names, addresses, CIDR
blocks), checked at submit (:func:`callback_refusal`) and again at delivery, on the address
actually connected to (:meth:`Allow.address_allowed`). Standard library only: the farm's
configuration validates the list on load without importing the deliverer.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Allow:
    """``MELTER_CALLBACK_ALLOW`` parsed: host names (exact, any case) and networks."""

    names: frozenset[str]
    networks: tuple[Network, ...]

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def parse_allow(text: str) -> Allow:
    """The allow-list from its comma-separated text; ValueError names a bad entry."""
    names: set[str] = set()
    networks: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?",
                            entry):
            raise ValueError(f"callback_allow: {raw.strip()!r} is neither a host name, an "
                             "address nor a CIDR block")
        names.add(entry.rstrip("."))
    if not names and not networks:
        raise ValueError("callback_allow is set but lists no host")
    return Allow(frozenset(names), tuple(networks))


def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


def callback_refusal(url: str, allow_text: str | None) -> str | None:
    """Why ``url`` may not receive callbacks under the allow-list (None: it may). A listed
    name is allowed as such; any other host must be an address, or resolve only to addresses,
    inside a listed network."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        return f"{url}: not an http:// or https:// URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{url}: bad port"
    if not allow_text:
        return None
    allow = parse_allow(allow_text)
    if host in allow.names:
        return None
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if literal:
        addresses = [host]
    else:
        try:
            addresses = [str(info[4][0]) for info in resolve(host, port)]
        except OSError:
            return f"host {host} does not resolve (MELTER_CALLBACK_ALLOW needs its address)"
    if addresses and all(allow.address_allowed(a) for a in addresses):
        return None
    return f"host {host} is not allowed (MELTER_CALLBACK_ALLOW)"
