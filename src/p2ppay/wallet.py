"""One person's side of p2ppay: a server session that reconnects, the offer listener, pay().

The shell, the tests and the benchmark drive a :class:`Wallet`; it owns (in its nursery) the
connection to the server, this session's offer listener and the links to payees. A payment is
the flow of docs/protocol.md §8: lookup, offer to the payee directly, settle with the payee's
signed acceptance, retried with the same payment id if the server connection drops.
"""

from __future__ import annotations

import builtins
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar, final

import trio

from . import protocol as p
from .client import Client, ClientError, ConnectionLost, ServerError
from .names import name_key
from .peer import (
    Dialer,
    OfferListener,
    PeerConfig,
    PeerError,
    PeerIdentity,
    PeerKey,
    Policy,
    decline_all,
    open_offer_listeners,
)

log = logging.getLogger("p2ppay.wallet")

T = TypeVar("T")

SETTLE_ATTEMPTS: Final = 4
EVENT_BUFFER: Final = 1000


class PaymentFailed(ClientError):
    """A payment did not happen; ``code`` says why (see the README's list of outcomes)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class OfferAnswered:
    """Our listener answered an offer (the settlement, if any, comes as PaymentReceived)."""

    offer: p.Offer
    accepted: bool


@dataclass(frozen=True, slots=True)
class NotSettledNews:
    """A payer reports that an offer we accepted was not settled after all (and why)."""

    payer: str
    news: p.NotSettled


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection to the server ended; the next command reconnects."""

    reason: str


WalletEvent: TypeAlias = p.Event | OfferAnswered | NotSettledNews | Disconnected


@final
class Wallet:
    """A person's agent. Make one with :meth:`open`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        connect: Callable[[], AbstractAsyncContextManager[Client]],
        *,
        policy: Policy,
        peer_config: PeerConfig,
        listen_host: str | None,
        listen_port: int,
    ) -> None:
        self._nursery = nursery
        self._connect_fn = connect
        self.policy = policy
        self.peer_config = peer_config
        self.listen_host = listen_host
        self.listen_port = listen_port
        self._client: Client | None = None
        self._client_scope: trio.CancelScope | None = None
        self._credentials: tuple[str, str] | None = None
        self._key: PeerKey | None = None
        self.identity: PeerIdentity | None = None
        self.listener: OfferListener | None = None
        self.dialer: Dialer | None = None
        self.p2p_port: int | None = None
        #: our balance as last seen (login, deposit, list, payments, events): a hint only
        self.known_balance: int | None = None
        self._listener_scope: trio.CancelScope | None = None
        self._event_send, self.events = trio.open_memory_channel[WalletEvent](EVENT_BUFFER)
        self._reconnect_lock = trio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        policy: Policy = decline_all,
        listen_host: str | None = None,
        listen_port: int = 0,
        peer_config: PeerConfig | None = None,
        request_timeout: float = 30.0,
    ) -> AsyncIterator[Wallet]:
        def connect() -> AbstractAsyncContextManager[Client]:
            return Client.connect(
                host,
                port,
                ssl_context=ssl_context,
                server_hostname=server_hostname,
                request_timeout=request_timeout,
            )

        async with cls.using(
            connect,
            policy=policy,
            listen_host=listen_host,
            listen_port=listen_port,
            peer_config=peer_config,
        ) as wallet:
            yield wallet

    @classmethod
    @asynccontextmanager
    async def using(
        cls,
        connect: Callable[[], AbstractAsyncContextManager[Client]],
        *,
        policy: Policy = decline_all,
        listen_host: str | None = None,
        listen_port: int = 0,
        peer_config: PeerConfig | None = None,
    ) -> AsyncIterator[Wallet]:
        """Like :meth:`open` with any way of connecting (tests cut connections with this)."""
        async with trio.open_nursery() as nursery:
            wallet = cls(
                nursery,
                connect,
                policy=policy,
                peer_config=peer_config or PeerConfig(),
                listen_host=listen_host,
                listen_port=listen_port,
            )
            await wallet._connect()
            try:
                yield wallet
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await wallet._close()
                nursery.cancel_scope.cancel()

    # -- the server connection --

    async def _connect(self) -> Client:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Client]) -> None:
            with scope:
                async with self._connect_fn() as client:
                    task_status.started(client)
                    async for event in client.events:
                        self._emit(event)
                    self._emit(Disconnected("the connection to the server was lost"))

        client: Client = await self._nursery.start(run)
        self._client, self._client_scope = client, scope
        return client

    def _emit(self, event: WalletEvent) -> None:
        if isinstance(event, p.PaymentReceived):
            self.known_balance = event.balance
        try:
            self._event_send.send_nowait(event)
        except trio.WouldBlock:
            log.warning("wallet event buffer full; dropped %r", event)

    async def _server(self) -> Client:
        """The live server connection, reconnecting (and logging in again) if it was lost."""
        client = self._client
        if client is not None and not client.closed:
            return client
        return await self._reconnect()

    async def _reconnect(self) -> Client:
        async with self._reconnect_lock:
            if self._client is not None and not self._client.closed:
                return self._client
            if self._client_scope is not None:
                self._client_scope.cancel()
            client = await self._connect()
            if self._credentials is not None and self._key is not None:
                name, password = self._credentials
                await client.login(name, password, self.p2p_port, self._key.csr(name))
            return client

    async def _call(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        return await fn(await self._server())

    # -- accounts --

    @property
    def user(self) -> str | None:
        return self._credentials[0] if self._credentials else None

    async def register(self, name: str, password: str) -> None:
        await self._call(lambda c: c.register(name, password))

    async def login(self, name: str, password: str) -> p.LoginResult:
        """Log in, get this session's certificate, and start taking offers."""
        if self._credentials is not None:
            raise ServerError("already_logged_in", "already logged in; log out first")
        listeners = await open_offer_listeners(self.listen_host, self.listen_port)
        port = listeners[0].socket.getsockname()[1]
        key = PeerKey()
        try:
            client = await self._server()
            result = await client.login(name, password, port, key.csr(name))
            self.known_balance = result.balance
            if result.certificate is None or result.peer_ca is None:
                raise ServerError("bad_csr", "the server issued no certificate")
            identity = await trio.to_thread.run_sync(
                PeerIdentity.build, result.name, key, result.certificate, result.peer_ca
            )
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        self._credentials, self._key, self.identity, self.p2p_port = (
            (result.name, password),
            key,
            identity,
            port,
        )
        self.dialer = Dialer(identity, self.peer_config)
        self.listener = OfferListener(identity, self._decide, self.peer_config)
        self.listener.on_not_settled = lambda payer, news: self._emit(NotSettledNews(payer, news))
        await self._nursery.start(self._serve_offers, self.listener, listeners)
        log.info("logged in as %s; taking offers on port %d", result.name, port)
        return result

    async def _serve_offers(
        self,
        listener: OfferListener,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self._listener_scope = scope
            await listener.serve(listeners, task_status=task_status)

    async def _decide(self, offer: p.Offer) -> bool:
        accepted = await self.policy(offer)
        self._emit(OfferAnswered(offer, accepted))
        return accepted

    async def logout(self) -> None:
        await self._stop_peering()
        self._credentials = None
        client = self._client
        if client is not None and not client.closed:
            await client.logout()

    async def _stop_peering(self) -> None:
        if self._listener_scope is not None:
            self._listener_scope.cancel()
            self._listener_scope = None
        if self.dialer is not None:
            await self.dialer.aclose()
        self.dialer = self.listener = self.identity = None
        self._key = None
        self.p2p_port = None

    async def _close(self) -> None:
        if self._credentials is not None:
            try:
                await self.logout()
            except ClientError:
                pass
        await self._stop_peering()
        if self._client_scope is not None:
            self._client_scope.cancel()

    # -- money --

    async def deposit(self, amount: int) -> int:
        self.known_balance = await self._call(lambda c: c.deposit(amount))
        return self.known_balance

    async def list(self) -> p.ListResult:
        result = await self._call(lambda c: c.list())
        self.known_balance = result.balance
        return result

    async def balance(self) -> int:
        return (await self.list()).balance

    async def history(self, limit: int = 50) -> builtins.list[p.HistoryEntry]:
        return await self._call(lambda c: c.history(limit))

    async def pay(
        self, payee: str, amount: int, payment_id: uuid.UUID | None = None
    ) -> p.SettleResult:
        """Pay ``payee`` directly: offer, their signed acceptance, then settlement (once)."""
        me = self.user
        if me is None or self.dialer is None:
            raise PaymentFailed("not_logged_in", "log in first")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise PaymentFailed(
                "bad_amount", f"the amount must be a positive whole number: {amount!r}"
            )
        if name_key(payee) == name_key(me):
            raise PaymentFailed("self_payment", "you cannot pay yourself")
        if self.known_balance is not None and amount > self.known_balance:
            # Do not bother the payee with an offer we cannot pay (the server still decides:
            # this is only asked when our last known balance says it is short).
            balance = await self.balance()
            if amount > balance:
                raise PaymentFailed(
                    "insufficient_funds", f"your balance {balance} is less than {amount}"
                )
        try:
            where = await self._call(lambda c: c.lookup(payee))
        except ServerError as exc:
            raise PaymentFailed(exc.code, exc.message) from None
        offer = p.Offer(payment_id or uuid.uuid4(), me, payee, amount)
        try:
            answer = await self.dialer.offer(where, offer)
        except PeerError as exc:
            raise PaymentFailed(exc.code, exc.message) from None
        if isinstance(answer, p.Decline):
            raise PaymentFailed("declined", f"{payee} declined: {answer.reason}")
        try:
            result = await self._settle(offer, answer.signature)
        except PaymentFailed as exc:
            if exc.code != "server_unreachable":  # then it may yet be settled by a retry
                await self.dialer.tell(payee, p.NotSettled(offer.payment_id, exc.message[:200]))
            raise
        self.known_balance = result.balance
        return result

    async def _settle(self, offer: p.Offer, acceptance: str) -> p.SettleResult:
        """Settle, retrying with the same payment id across lost connections: at most once."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                client = await self._server()
                return await client.settle(offer.payment_id, offer.payee, offer.amount, acceptance)
            except ServerError as exc:
                raise PaymentFailed(exc.code, exc.message) from None
            except (ConnectionLost, OSError) as exc:
                if attempt == SETTLE_ATTEMPTS:
                    raise PaymentFailed(
                        "server_unreachable",
                        f"could not reach the server to settle {offer.payment_id}; "
                        "retry with the same payment id",
                    ) from exc
                log.info("settle %s: %s; reconnecting (try %d)", offer.payment_id, exc, attempt)
                await trio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")
