"""Where a connection comes from: a socket stream's remote address and port, and what the
per-address limits count as one address. No I/O beyond asking the socket."""

from __future__ import annotations

import ipaddress

import trio


def peer_ip(stream: trio.abc.Stream) -> str:
    """The remote address of a socket stream ("unknown" for anything else)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "unknown"
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "unknown"


def peer_port(stream: trio.abc.Stream) -> int:
    """The remote port of a socket stream (0 for anything else)."""
    sock = getattr(stream, "socket", None)
    try:
        return int(sock.getpeername()[1]) if sock is not None else 0
    except (OSError, IndexError, TypeError, ValueError):
        return 0


def address_key(ip: str) -> str:
    """What the per-address limits count as one address: an IPv4 address, or an IPv6 /64 (what
    one subscriber is given: counting its 2^64 addresses apart would make per-address limits
    moot). An IPv4-mapped IPv6 address counts as its IPv4 address; anything else as itself."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
