"""Listening sockets that several worker processes share (SO_REUSEPORT), and why a bind failed.

With ``--workers N`` every worker opens its own listening socket on the same port with
SO_REUSEPORT, and the kernel spreads new connections over them. The supervisor first checks
that the port is free (a bind *without* SO_REUSEPORT, which fails if anything at all holds it,
another p2ppay's workers included: with SO_REUSEPORT alone they would quietly share it with
us), then holds it with a bound but never listening SO_REUSEPORT socket until its workers
listen. Such a socket is in no accept queue: no connection ever waits on it. Port 0 is
resolved there, once, so that every worker gets the same port.
"""

from __future__ import annotations

import errno
import socket
from typing import Final

import trio

#: what the kernel caps at net.core.somaxconn (trio's own default for open_tcp_listeners)
BACKLOG: Final = 0xFFFF


class BindError(Exception):
    """A port cannot be listened on; the message says why, in one line."""


def bind_error(exc: OSError, port: int, host: str | None) -> BindError:
    """The one line for a failed bind on ``port``."""
    where = f"port {port}" if host is None else f"{host} port {port}"
    if exc.errno == errno.EADDRINUSE:
        return BindError(f"{where} is already in use")
    if exc.errno == errno.EACCES:
        return BindError(f"{where} is not allowed for this user")
    return BindError(f"cannot listen on {where}: {exc.strerror or exc}")


def _addresses(port: int, host: str | None) -> list[tuple[int, int, int, tuple[str, int]]]:
    """Where to bind, as ``trio.open_tcp_listeners`` would: every interface (IPv4 and IPv6)
    when ``host`` is None; each address once."""
    found: list[tuple[int, int, int, tuple[str, int]]] = []
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        entry = (int(family), int(kind), proto, (str(sockaddr[0]), int(sockaddr[1])))
        if entry not in found:
            found.append(entry)
    return found


def _new_socket(family: int, kind: int, proto: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def reserve(port: int, host: str | None) -> tuple[int, list[socket.socket]]:
    """Check that ``port`` on ``host`` is free and hold it for workers to share: the port (the
    one picked, for 0) and the held sockets, which the caller closes once its workers listen.
    Raises :class:`BindError`."""
    held: list[socket.socket] = []
    chosen = port
    try:
        for family, kind, proto, (address, _) in _addresses(port, host):
            try:
                with _new_socket(family, kind, proto, reuse_port=False) as probe:
                    probe.bind((address, chosen))
                    chosen = int(probe.getsockname()[1])
                # A moment here where another program could take the port: then the next
                # bind fails, and says so.
                hold = _new_socket(family, kind, proto, reuse_port=True)
                held.append(hold)
                hold.bind((address, chosen))
            except OSError as exc:
                raise bind_error(exc, chosen, host) from None
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return chosen, held


def check_free(port: int, host: str | None) -> None:
    """Raise :class:`BindError` if ``port`` (not 0) on ``host`` cannot be bound just now."""
    for family, kind, proto, (address, _) in _addresses(port, host):
        try:
            with _new_socket(family, kind, proto, reuse_port=False) as probe:
                probe.bind((address, port))
        except OSError as exc:
            raise bind_error(exc, port, host) from None


async def reuseport_listeners(port: int, host: str | None) -> list[trio.SocketListener]:
    """Like ``trio.open_tcp_listeners(port, host=host)``, with SO_REUSEPORT set on each socket,
    so that the other workers' listeners on the same port share the connections."""
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, address in await trio.to_thread.run_sync(_addresses, port, host):
            sock = trio.socket.from_stdlib_socket(_new_socket(family, kind, proto, reuse_port=True))
            try:
                await sock.bind(address)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners
