"""What every server session is: one connection owned from its first byte to its close, its
replies written one at a time with a deadline, and what it needs from the server (:class:`Host`).

The native session (:mod:`.native`) and the course-dialect session (:mod:`.course_session`)
are both built on :class:`SessionBase`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

import trio

from .. import ledger as lg
from .. import logs
from ..course import Dialect
from ..limits import LimitLog
from ..metrics import ServerMetrics
from ..receipts import ReceiptSigner
from ..sending import Outgoing
from .accounts import Accounts
from .config import ServerConfig
from .presence import Presence

log = logging.getLogger("p2ppay.server")


class Host(Protocol):
    """What a session may use of the server that owns it (and nothing else)."""

    config: ServerConfig
    ledger: lg.Ledger
    accounts: Accounts
    presence: Presence
    limit_log: LimitLog
    #: the course dialect's login reply names this (base64 DER of the server's key)
    server_public_key: str
    course_dialect: Dialect
    metrics: ServerMetrics
    #: signs receipts of settlements
    receipts: ReceiptSigner

    @property
    def closing(self) -> bool:
        """True once the server is shutting down."""

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a short background job (an event delivery) under the server's nursery."""


class SessionBase:
    """One connection's session: subclasses implement :meth:`serve`."""

    #: which dialect's presence it is listed in
    course: ClassVar[bool] = False

    def __init__(self, host: Host, stream: trio.abc.Stream, ip: str) -> None:
        self.host = host
        self.stream = stream
        self.ip = ip
        self.user: str | None = None  # as registered
        self.cancel_scope = trio.CancelScope()  # cancelled to drop the connection
        self.receive_scope = trio.CancelScope()  # cancelled to stop reading at shutdown
        self._out = Outgoing(stream)

    @property
    def listed_port(self) -> int | None:
        """The port this session is listed with."""
        return None

    def replaced(self, by_ip: str) -> None:
        """A newer login of the same account took over (see :mod:`.presence`)."""
        raise NotImplementedError

    def paid(self, transfer: lg.Transfer) -> None:
        """A payment to this session's account was settled (only native sessions are told)."""

    def told(self, line: bytes) -> None:
        """A line for this session's client from elsewhere (a course transfer's outcome)."""
        self.send_soon(line)

    async def serve(self) -> None:
        """Answer the peer until the conversation is over."""
        raise NotImplementedError

    async def run(self) -> None:
        """Serve, then close the connection, whatever happens in between."""
        try:
            with self.cancel_scope:
                await self.serve()
        except trio.BrokenResourceError:
            log.info("%s: connection lost", self.ip)
        except trio.ClosedResourceError:
            pass
        finally:
            self.host.presence.forget(self, course=self.course)
            with trio.CancelScope(shield=True):
                await self.close_stream()

    async def close_stream(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def wake(self) -> None:
        """Stop waiting for the peer (the server is shutting down)."""
        self.receive_scope.cancel()

    async def send(self, data: bytes) -> None:
        """Write one message; a peer that will not take it within the write timeout is dropped."""
        with trio.move_on_after(self.host.config.write_timeout) as scope:
            await self._out.send(data)
        if scope.cancelled_caught:
            self.host.limit_log.hit("write-timeout", f"{self.ip} stopped reading; dropped")
            self.cancel_scope.cancel()

    def send_soon(self, data: bytes, *, then_close: bool = False) -> None:
        """Send ``data`` (best effort) without making the caller wait for this peer."""

        async def deliver() -> None:
            logs.bind_connection(self)  # spawned by another session's task: about this one
            try:
                await self.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.host.metrics.event_dropped()
            if then_close:
                self.cancel_scope.cancel()

        self.host.spawn(deliver)
