"""Network policy: which addresses may be connected to, and how long to wait before a retry."""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass

from pipeline.errors import ItemError
from pipeline.stages.shared.retry_after import parse_retry_after

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ROBOTS_DENY = frozenset({"noai", "noimageai"})


class BlockedAddress(Exception):
    """Raised inside a connection when the resolved address is not allowed."""


def public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


@dataclass(frozen=True)
class AllowEntry:
    """One `allow_hosts` entry: a host name or a network, optionally with a port."""

    host: str | None
    network: Network | None
    port: int | None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """'host', 'host:port', '[v6]:port', an address or a CIDR network."""
        text = text.strip().lower()
        try:
            return cls(None, ipaddress.ip_network(text.strip("[]"), strict=False), None)
        except ValueError:
            pass
        host, port = _split_port(text)
        try:
            return cls(None, ipaddress.ip_network(host.strip("[]"), strict=False), port)
        except ValueError:
            return cls(host, None, port)

    def matches(self, host: str, ip: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            return ip in self.network or (mapped is not None and mapped in self.network)
        return host.lower().rstrip(".") == self.host


def _split_port(text: str) -> tuple[str, int | None]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, None
    if not host or not port.isdigit() or (":" in host and not host.endswith("]")):
        raise ValueError(f"{text!r} is not 'host', 'host:port' or a CIDR network")
    return host, int(port)


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses are allowed; others only when an `allow_hosts` entry matches."""

    allowed: tuple[AllowEntry, ...] = ()

    @classmethod
    def from_entries(cls, entries: tuple[str, ...]) -> AddressPolicy:
        return cls(tuple(AllowEntry.parse(entry) for entry in entries))

    def permits(self, host: str, ip: IPAddress, port: int) -> bool:
        return public(ip) or any(entry.matches(host, ip, port) for entry in self.allowed)

    def resolve(self, host: str, port: int) -> str:
        """The first resolved address of `host` that may be connected to.

        Raises socket.gaierror if the name does not resolve, BlockedAddress if
        every address it resolves to is refused.
        """
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if self.permits(host, ipaddress.ip_address(address.split("%")[0]), port):
                return address
        raise BlockedAddress(f"{host} resolves to {addresses[0]}, which is not a public address")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After is honoured up to a cap."""

    base: float
    cap: float
    retry_after_cap: float

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = min(self.cap, self.base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        asked = parse_retry_after(retry_after) if retry_after else None
        if asked is None:
            return backoff
        return max(backoff, min(asked, self.retry_after_cap))


def check_robots_tag(values: list[str]) -> None:
    """Refuse a response whose X-Robots-Tag says noai or noimageai (any user agent)."""
    for value in values:
        for directive in value.lower().split(","):
            token = directive.rsplit(":", 1)[-1].strip()
            if token in ROBOTS_DENY:
                raise ItemError("disallowed", f"X-Robots-Tag: {value}")
