"""Who gets in: connection limits (in all and per address) and the TLS handshake's deadline."""

from __future__ import annotations

import logging
import ssl
from typing import Any, final

import trio

from p2ppay.logs import LimitLog

log = logging.getLogger("p2ppay.server")


@final
class Admission:
    """Counts connections in and out, and does the TLS handshake within its deadline."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        limit_log: LimitLog,
        *,
        max_connections: int,
        max_per_ip: int,
        handshake_timeout: float,
    ) -> None:
        self.ssl_context = ssl_context
        self.limit_log = limit_log
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.handshake_timeout = handshake_timeout
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        """Count a new connection in, unless it would pass a connection limit."""
        if self.connections >= self.max_connections:
            self.limit_log.hit("max-connections", f"{self.max_connections} open; refused {ip}")
            return False
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            self.limit_log.hit("max-connections-per-ip", f"{self.max_per_ip} open from {ip}")
            return False
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        """Count a connection that :meth:`admit` let in out again."""
        self.connections -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    async def handshake(self, transport: trio.abc.Stream, ip: str) -> trio.SSLStream[Any] | None:
        """TLS within the handshake timeout, or None (and the transport closed)."""
        stream = trio.SSLStream(transport, self.ssl_context, server_side=True)
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            # Garbage instead of TLS, a port scan, a client that does not trust us: common
            # enough to be worth a line now and then, not one per connection.
            self.limit_log.hit("tls-handshake-failed", f"{ip}: {exc.__cause__ or exc}")
            await trio.aclose_forcefully(stream)
            return None
        if scope.cancelled_caught:
            self.limit_log.hit("tls-handshake-timeout", f"{ip} stayed silent")
            await trio.aclose_forcefully(stream)
            return None
        return stream
