"""What every server session is: one connection owned from its first byte to its close, its
replies written one at a time with a deadline, and what it needs from the server (:class:`Host`).

The native session (:mod:`.native`) and the course-dialect session (:mod:`.course_session`)
are both built on :class:`SessionBase`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

import trio

from p2ppay import ledger as lg
from p2ppay import logs
from p2ppay import wire as p
from p2ppay.logs import LimitLog
from p2ppay.presence.local import Presence
from p2ppay.receipts import ReceiptSigner
from p2ppay.server.accounts import Accounts
from p2ppay.server.config import ServerConfig
from p2ppay.server.metrics import ServerMetrics
from p2ppay.server.sending import Outgoing
from p2ppay.server.throttle import RequestLimit
from p2ppay.wire.course import Dialect

log = logging.getLogger("p2ppay.server")


class Host(Protocol):
    """What a session may use of the server that owns it (and nothing else)."""

    config: ServerConfig
    ledger: lg.Ledger
    accounts: Accounts
    presence: Presence
    limit_log: LimitLog
    #: how fast each account may make payment requests
    request_limit: RequestLimit
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
        #: waiting for the peer's next request with no receive scope (see :meth:`wake`)
        self.idle_read = False
        self._woken_in_idle_read = False
        self._out = Outgoing(stream)
        self._write_timed_out = False  # the peer stopped reading: the session was cut
        self._delivery_scheduled = False  # a _deliver task will flush what is queued
        #: a request is being answered: its reply will be written soon and carries whatever
        #: is queued by then (a subclass sets it only where every request gets a reply)
        self.answering = False
        #: the request being answered was a write: other sessions' events from its commit may
        #: be queued for this peer in the same scheduling pass (see :meth:`send`)
        self.answering_a_write = False
        self._close_after_flush = False  # replaced: close once the last message is out

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

    def push(self, event: p.Event) -> None:
        """An event for this session's client (only native sessions have events)."""

    async def serve(self) -> None:
        """Answer the peer until the conversation is over."""
        raise NotImplementedError

    async def run(self) -> None:
        """Serve, then close the connection, whatever happens in between."""
        try:
            with self.cancel_scope:
                await self.serve()
            if self._woken_in_idle_read:
                with trio.move_on_after(self.host.config.write_timeout) as bye:
                    await self.goodbye()
                self._write_timed_out |= bye.cancelled_caught
            if self._write_timed_out:
                self.host.limit_log.hit("write-timeout", f"{self.ip} stopped reading; dropped")
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
        if self.idle_read:
            # Nothing is in flight: the session itself is cancelled, and says goodbye after.
            self._woken_in_idle_read = True
            self.cancel_scope.cancel()

    async def goodbye(self) -> None:
        """Tell the peer the server is shutting down (and what it sent that was not done)."""

    async def send(self, data: bytes) -> None:
        """Write one message (and any event queued before it); a peer that will not take it
        within the write timeout is dropped.

        The timeout is the session's own cancel scope's deadline, armed for the write: no
        scope of its own per message. When it fires the whole session ends, which is what a
        write timeout always did (see :meth:`run`)."""
        scope = self.cancel_scope
        scope.deadline = trio.current_time() + self.host.config.write_timeout
        try:
            self._out.queue(data)
            if self.answering and self.answering_a_write:
                # Let the other tasks woken with this one (a commit answers a whole batch of
                # payments at once) queue their events for this peer first: one write for all.
                # (A read's reply does not wait: nothing woke with it.)
                await trio.lowlevel.checkpoint()
            await self._out.flush()
        except trio.Cancelled:
            self._write_timed_out = trio.current_time() >= scope.deadline
            raise
        finally:
            scope.deadline = math.inf

    def send_soon(self, data: bytes, *, then_close: bool = False) -> None:
        """Send ``data`` (best effort) without making the caller wait for this peer.

        It is queued behind whatever this session is writing; the reply the session sends
        next carries it, or one delivery task for everything queued by then (one per burst,
        not one per message)."""
        idle = self._out.queue(data) and not self.answering
        if then_close:
            self._close_after_flush = True
        if (idle or then_close) and not self._delivery_scheduled:
            self._delivery_scheduled = True
            self.host.spawn(self._deliver)

    async def _deliver(self) -> None:
        """Write what :meth:`send_soon` queued (spawned: another session's task queued it)."""
        self._delivery_scheduled = False
        logs.bind_connection(self)
        with trio.move_on_after(self.host.config.write_timeout) as scope:
            try:
                await self._out.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.host.metrics.event_dropped()
        if scope.cancelled_caught:
            self.host.limit_log.hit("write-timeout", f"{self.ip} stopped reading; dropped")
            self.cancel_scope.cancel()
        elif self._close_after_flush:
            self.cancel_scope.cancel()
