"""The client library: one TLS connection to the server, a method per operation, and events.

Used alike by the shell, the tests and the benchmark::

    async with Client.connect("localhost", 8700, ssl_context=ctx) as client:
        await client.login("alice", "secret-password", p2p_port=9001)
        result = await client.settle("bob", 30)
        async for event in client.events: ...

Requests may be issued from several tasks at once; replies are matched to them by id, and
events pushed by the server may arrive at any moment in between.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, final

import msgspec.structs
import trio

from p2ppay import __version__
from p2ppay import wire as p
from p2ppay.wire.constraints import EVENT_BUFFER
from p2ppay.wire.errors import CodedError

log = logging.getLogger("p2ppay.client.connection")

R = TypeVar("R")

DEFAULT_TIMEOUT: Final = 30.0
#: The server's replies (a long ``list``) may be longer than what it accepts from us.
CLIENT_MAX_LINE: Final = 1024 * 1024


class ClientError(Exception):
    """Base class for what the client library raises."""


class ServerError(CodedError, ClientError):
    """The server answered a request with an error (``code`` is one of ErrorCode's)."""


class ConnectionLost(ClientError):
    """The connection to the server ended before the reply came."""


class _Waiter:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: ClientError | None = None


@final
class Client:
    """A connection to a p2ppay server. Make one with :meth:`connect` or :meth:`over`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        request_timeout: float = DEFAULT_TIMEOUT,
        max_depth: int = p.DEFAULT_MAX_DEPTH,
    ) -> None:
        self._stream = stream
        self._conn = p.ClientConnection(CLIENT_MAX_LINE, max_depth)
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._closed: ClientError | None = None
        self.request_timeout = request_timeout
        self._event_send, self.events = trio.open_memory_channel[p.Event](EVENT_BUFFER)
        self.user: str | None = None
        self.server_version: str | None = None

    # -- opening --

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncIterator[Client]:
        """Open TCP, verify the server's certificate, say hello.

        ``request_timeout`` bounds the connection set-up and, later, each request."""
        with trio.fail_after(request_timeout):
            tcp = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
        try:
            with trio.fail_after(request_timeout):
                await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        async with cls.over(stream, request_timeout=request_timeout) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(
        cls, stream: trio.abc.Stream, *, request_timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[Client]:
        """Use an already connected (TLS) stream; the client owns and closes it."""
        client = cls(stream, request_timeout=request_timeout)
        # A failed hello is raised outside the nursery, as itself: callers tell "could not
        # connect" from everything else without unpacking exception groups.
        try:
            failed: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._read_loop)
                    try:
                        hello = await client._call(
                            p.Hello(0, p.PROTOCOL_VERSION, f"p2ppay/{__version__}")
                        )
                    except (ClientError, trio.TooSlowError) as exc:
                        failed = exc  # raised below, outside the nursery: not in a group
                        nursery.cancel_scope.cancel()
                    else:
                        client.server_version = hello.server
                        yield client
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader never raises (it ends the connection instead), so a group holds
                # what the caller's own block raised: let that through as it was raised.
                if len(group.exceptions) != 1:
                    raise
                failed = group.exceptions[0]
            if failed is not None:
                raise failed
        finally:
            client._fail_all(ConnectionLost("the client was closed"))
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1) as polite:
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                if polite.cancelled_caught:
                    await trio.aclose_forcefully(stream)

    @property
    def stream(self) -> trio.abc.Stream:
        """The stream this client owns (for tools and tests that must write raw bytes)."""
        return self._stream

    @property
    def closed(self) -> bool:
        """True once the connection has ended (no request can succeed any more)."""
        return self._closed is not None

    # -- the machinery --

    async def _read_loop(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is p.NEED_DATA:
                    data = await self._stream.receive_some()
                    self._conn.receive_data(data)
                elif event is p.CLOSED:
                    self._fail_all(ConnectionLost("the server closed the connection"))
                    return
                elif isinstance(event, p.ReplyOk):
                    waiter = self._waiters.pop(event.id, None)
                    if waiter is not None:
                        waiter.result = event.result
                        waiter.done.set()
                elif isinstance(event, p.ReplyError):
                    if event.id is None:
                        log.warning("server error: %s: %s", event.code, event.message)
                        continue
                    waiter = self._waiters.pop(event.id, None)
                    if waiter is not None:
                        waiter.error = ServerError(event.code, event.message)
                        waiter.done.set()
                else:
                    assert not isinstance(event, p.Sentinel)
                    if isinstance(event, p.SessionReplaced):
                        self.user = None
                    try:
                        self._event_send.send_nowait(event)
                    except trio.WouldBlock:
                        log.warning("event buffer full; dropped %r", event)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail_all(ConnectionLost(f"connection lost: {exc}"))
        except p.RemoteProtocolError as exc:
            self._fail_all(ConnectionLost(f"the server broke the protocol: {exc}"))

    def _fail_all(self, error: ClientError) -> None:
        if self._closed is None:
            self._closed = error
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.error = error
            waiter.done.set()
        self._event_send.close()

    async def _call(self, request: Any) -> Any:
        """Send a request (its ``id`` is replaced) and wait for the reply."""
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        request = _with_id(request, rid)
        waiter = _Waiter()
        self._waiters[rid] = waiter
        data = self._conn.send_request(request)
        try:
            with trio.fail_after(self.request_timeout):
                async with self._send_lock:
                    await self._stream.send_all(data)
                await waiter.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc
        finally:
            if not waiter.done.is_set():
                self._waiters.pop(rid, None)
                self._conn.forget(rid)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    # -- operations --

    async def register(self, name: str, password: str) -> p.RegisterResult:
        result: p.RegisterResult = await self._call(p.Register(0, name, password))
        return result

    async def login(
        self, name: str, password: str, p2p_port: int | None = None, csr: str | None = None
    ) -> p.LoginResult:
        """Log in; with a ``csr`` the server certifies its key for this session (the result
        then carries the certificate and the peer CA)."""
        result: p.LoginResult = await self._call(p.Login(0, name, password, p2p_port, csr))
        self.user = result.name
        return result

    async def deposit(self, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        """Deposit; with a ``deposit_id`` a retry with the same id moves money once."""
        result: p.BalanceResult = await self._call(p.Deposit(0, amount, deposit_id))
        return result.balance

    async def list(self) -> p.ListResult:
        result: p.ListResult = await self._call(p.ListOnline(0))
        return result

    async def balance(self) -> int:
        return (await self.list()).balance

    async def lookup(self, name: str) -> p.Presence:
        result: p.Presence = await self._call(p.Lookup(0, name))
        return result

    async def settle(
        self,
        payment_id: uuid.UUID,
        payee: str,
        amount: int,
        acceptance: str,
        memo: str | None = None,
    ) -> p.SettleResult:
        """Settle a payment ``payee`` accepted (``acceptance`` is its signature).

        Retrying with the same ``payment_id`` never pays twice."""
        result: p.SettleResult = await self._call(
            p.Settle(0, payment_id, payee, amount, acceptance, memo)
        )
        return result

    async def request(
        self, payer: str, amount: int, memo: str | None = None, expires_in: int | None = None
    ) -> p.RequestInfo:
        """Ask ``payer`` to pay us ``amount``."""
        result: p.RequestInfo = await self._call(p.MakeRequest(0, payer, amount, memo, expires_in))
        return result

    async def requests(self) -> p.RequestsResult:
        result: p.RequestsResult = await self._call(p.ListRequests(0))
        return result

    async def pay_request(self, request_id: uuid.UUID) -> p.SettleResult:
        """Pay a request made to us; a retry with the same id never pays twice."""
        result: p.SettleResult = await self._call(p.PayRequest(0, request_id))
        return result

    async def decline_request(self, request_id: uuid.UUID) -> p.RequestInfo:
        result: p.RequestInfo = await self._call(p.DeclineRequest(0, request_id))
        return result

    async def cancel_request(self, request_id: uuid.UUID) -> p.RequestInfo:
        result: p.RequestInfo = await self._call(p.CancelRequest(0, request_id))
        return result

    async def receipt(self, payment_id: uuid.UUID) -> p.Receipt:
        result: p.Receipt = await self._call(p.GetReceipt(0, payment_id))
        return result

    async def passwd(self, old_password: str, new_password: str) -> None:
        await self._call(p.Passwd(0, old_password, new_password))

    async def history(self, limit: int = 50) -> builtins.list[p.HistoryEntry]:
        return (await self.history_page(limit)).entries

    async def history_page(
        self,
        limit: int = 50,
        *,
        before: int | None = None,
        counterparty: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> p.HistoryResult:
        """One page of history, newest first; pass its ``next`` as ``before`` for the next."""
        result: p.HistoryResult = await self._call(
            p.History(0, limit, before, counterparty, since_ms, until_ms)
        )
        return result

    async def payment_status(self, payment_id: uuid.UUID) -> p.PaymentStatusResult:
        """Whether ``payment_id`` is settled (and what it was, if we paid it or were paid)."""
        result: p.PaymentStatusResult = await self._call(p.PaymentStatus(0, payment_id))
        return result

    async def logout(self) -> None:
        await self._call(p.Logout(0))
        self.user = None

    async def next_event(self) -> p.Event:
        """The next event the server pushed; raises ConnectionLost when there will be none.

        It waits as long as it takes: wrap it in ``trio.fail_after`` to bound the wait."""
        try:
            return await self.events.receive()
        except trio.EndOfChannel:
            raise self._closed or ConnectionLost("closed") from None


def _with_id(request: Any, rid: int) -> Any:
    return msgspec.structs.replace(request, id=rid)
