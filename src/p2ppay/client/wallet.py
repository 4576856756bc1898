"""One person's side of p2ppay: a server session that reconnects, the offer listener, pay().

The shell, the tests and the benchmark drive a :class:`Wallet`; it owns (in its nursery) the
connection to the server, this session's offer listener and the links to payees. A payment is
the flow of docs/protocol.md §8: lookup (none while an open link to the payee says where they
are), offer to the payee directly, settle with the payee's signed acceptance, retried with the
same payment id if the server connection drops.
"""

from __future__ import annotations

import builtins
import errno
import logging
import random
import socket
import ssl
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar, final

import trio

from p2ppay import wire as p
from p2ppay.client.connection import Client, ClientError, ConnectionLost, ServerError
from p2ppay.client.outcomes import Outcome
from p2ppay.client.peer import (
    Dialer,
    LinkBroke,
    OfferListener,
    PeerConfig,
    PeerError,
    PeerIdentity,
    PeerKey,
    Policy,
    decline_all,
    open_offer_listeners,
)
from p2ppay.tls import explain_connect_failure
from p2ppay.wire.constraints import EVENT_BUFFER, is_amount, memo_problem
from p2ppay.wire.errors import CodedError
from p2ppay.wire.names import name_key

log = logging.getLogger("p2ppay.client.wallet")

T = TypeVar("T")

SETTLE_ATTEMPTS: Final = 4
#: Reconnecting after the server connection drops while logged in: the first wait, and the
#: most any wait grows to (each wait is drawn at random between half of it and all of it, so
#: that many clients of a restarted server do not all come back in the same instant).
RECONNECT_FIRST_DELAY: Final = 0.25
RECONNECT_MAX_DELAY: Final = 4.0
#: how many payments received lately a wallet remembers
RECEIVED_REMEMBERED: Final = 1024

#: Refusals of a login again after a reconnect that retrying will not change.
_FINAL_LOGIN_REFUSALS: Final = frozenset({"auth_failed", "unknown_user", "bad_csr"})

#: What failing to open a connection to the server (or to say hello on it) can raise.
_CONNECT_FAILURES: Final = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ConnectionLost,
)


class PaymentFailed(CodedError, ClientError):
    """A payment did not happen; ``code`` says why (see :class:`~p2ppay.outcomes.Outcome`)."""

    code: Outcome

    def __init__(self, code: Outcome, message: str) -> None:
        super().__init__(code, message)


class CannotConnect(ConnectionLost):
    """No connection to the server could be made (refused, unreachable, TLS refused...)."""


class PortUnavailable(ClientError):
    """The port for taking payments cannot be listened on (taken, or not allowed)."""


class NoSuchAddress(PortUnavailable):
    """The address given for taking payments is not one of this machine's."""


def describe_connect_failure(exc: BaseException) -> str:
    """One line saying why a connection to the server could not be made."""
    return explain_connect_failure(
        exc,
        untrusted="check --cafile and --server-name",
        closed="it may be refusing connections from your address: too many at once?",
    )


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
    """The connection to the server ended. A logged-in wallet reconnects by itself (then
    :class:`Reconnected` follows); otherwise the next command reconnects."""

    reason: str
    reconnecting: bool = False


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The server connection is back and we are logged in again as ``name``."""

    name: str


@dataclass(frozen=True, slots=True)
class LoggedOut:
    """We are no longer logged in, and will not log in again by ourselves (``reason`` says
    why: the session was taken over by a newer login, or logging in again was refused)."""

    reason: str


WalletEvent: TypeAlias = (
    p.Event | OfferAnswered | NotSettledNews | Disconnected | Reconnected | LoggedOut
)


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
        server_address: str = "the server",
        reconnect_delays: tuple[float, float] = (RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY),
    ) -> None:
        self._nursery = nursery
        self._connect_fn = connect
        #: how messages name the server ("localhost port 8700")
        self.server_address = server_address
        self.reconnect_delays = reconnect_delays
        self._reviving = False
        self._closing = False
        #: payments the server said reached us lately (a payer cannot call them unsettled)
        self._received: OrderedDict[uuid.UUID, None] = OrderedDict()
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
            server_address=f"{host} port {port}",
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
        server_address: str = "the server",
        reconnect_delays: tuple[float, float] = (RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY),
    ) -> AsyncIterator[Wallet]:
        """Like :meth:`open` with any way of connecting (tests cut connections with this).

        Raises :class:`CannotConnect` (not wrapped in an exception group) if the first
        connection cannot be made."""
        failure: CannotConnect | None = None
        async with trio.open_nursery() as nursery:
            wallet = cls(
                nursery,
                connect,
                policy=policy,
                peer_config=peer_config or PeerConfig(),
                listen_host=listen_host,
                listen_port=listen_port,
                server_address=server_address,
                reconnect_delays=reconnect_delays,
            )
            try:
                await wallet._connect()
            except CannotConnect as exc:
                # Raised below, outside the nursery, so that callers catch it as it is.
                failure = exc
                nursery.cancel_scope.cancel()
            else:
                try:
                    yield wallet
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await wallet._close()
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    # -- the server connection --

    async def _connect(self) -> Client:
        """Open a new server connection (its task lives in our nursery); raises
        :class:`CannotConnect` with the reason in one line."""
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[Client]) -> None:
            with scope:
                async with self._connect_fn() as client:
                    task_status.started(client)
                    async for event in client.events:
                        if isinstance(event, p.SessionReplaced):
                            self._forget_login()
                        self._emit(event)
                    if self.listener is not None:
                        # Offline, as far as the server knows: payers holding links to us
                        # must ask it again, not pay someone it cannot tell of the payment.
                        self.listener.go_offline()
                    reviving = self._credentials is not None and not self._closing
                    self._emit(Disconnected("the connection to the server was lost", reviving))
                    if reviving and not self._reviving:
                        self._reviving = True
                        self._nursery.start_soon(self._revive)

        try:
            client: Client = await self._nursery.start(run)
        except _CONNECT_FAILURES as exc:
            raise CannotConnect(
                f"cannot reach {self.server_address}: {describe_connect_failure(exc)}"
            ) from exc
        self._client, self._client_scope = client, scope
        return client

    async def _revive(self) -> None:
        """Logged in, and the server connection dropped: reconnect, backing off with jitter
        (the waits are bounded by ``reconnect_delays``), and log in again. Runs until that
        succeeds, we log out, or logging in again is refused."""
        first, most = self.reconnect_delays
        delay = first
        try:
            while self._credentials is not None and not self._closing:
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, most)
                name = self.user
                try:
                    await self._server()
                except ServerError as exc:
                    if exc.code not in _FINAL_LOGIN_REFUSALS:
                        log.info("logging in again as %s: %s; will retry", name, exc)
                        continue  # busy, rate limited, shutting down: try again later
                    # The server is back but will not have us (e.g. a changed password).
                    self._forget_login()
                    self._emit(LoggedOut(f"could not log in again as {name}: {exc.message}"))
                    return
                except (ClientError, *_CONNECT_FAILURES) as exc:
                    log.info("still no connection to %s: %s", self.server_address, exc)
                    continue
                if name is not None and self.user == name:
                    self._emit(Reconnected(name))
                return
        finally:
            self._reviving = False

    def _forget_login(self) -> None:
        """We are logged out (replaced by a newer login): never log in again by ourselves."""
        if self._credentials is not None:
            self._credentials = None
            self._nursery.start_soon(self._stop_peering)

    def _not_settled(self, payer: str, news: p.NotSettled) -> None:
        # A payer's word, about an offer we accepted: the server's own word (the payment
        # reached us) outranks it.
        if news.payment_id not in self._received:
            self._emit(NotSettledNews(payer, news))

    def _emit(self, event: WalletEvent) -> None:
        if isinstance(event, p.PaymentReceived):
            self.known_balance = event.balance
            self._received[event.payment_id] = None
            if len(self._received) > RECEIVED_REMEMBERED:
                self._received.popitem(last=False)
            if self.listener is not None:
                self.listener.settled(event.payment_id)
        try:
            self._event_send.send_nowait(event)
        except trio.WouldBlock:
            log.warning("wallet event buffer full; dropped %r", event)

    async def _server(self) -> Client:
        """The live server connection, reconnecting (and logging in again) if it was lost."""
        if self._usable(self._client):
            assert self._client is not None
            return self._client
        return await self._reconnect()

    def _usable(self, client: Client | None) -> bool:
        """A live connection, logged in if we are (a failed login again leaves it not)."""
        return (
            client is not None
            and not client.closed
            and (self._credentials is None or client.user is not None)
        )

    async def _reconnect(self) -> Client:
        async with self._reconnect_lock:
            if self._usable(self._client):
                assert self._client is not None
                return self._client
            client = self._client
            if client is None or client.closed:
                if self._client_scope is not None:
                    self._client_scope.cancel()
                client = await self._connect()
            if self._credentials is not None and self._key is not None:
                name, password = self._credentials
                result = await client.login(name, password, self.p2p_port, self._key.csr(name))
                self.known_balance = result.balance
                self._tell_news(result)
                if self.listener is not None:
                    self.listener.go_online()
            return client

    def _tell_news(self, result: p.LoginResult) -> None:
        """What happened to our payment requests while we were away, as events."""
        for request in result.request_news:
            self._emit(p.RequestClosed(request))

    async def _call(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        return await fn(await self._server())

    # -- accounts --

    @property
    def user(self) -> str | None:
        return self._credentials[0] if self._credentials else None

    async def register(self, name: str, password: str) -> None:
        await self._call(lambda c: c.register(name, password))

    async def login(
        self, name: str, password: str, *, listen_port: int | None = None
    ) -> p.LoginResult:
        """Log in, get this session's certificate, and start taking offers on ``listen_port``
        (default: the wallet's ``listen_port``; 0 is any free port)."""
        if self._credentials is not None:
            raise ServerError("already_logged_in", "already logged in; log out first")
        wanted = self.listen_port if listen_port is None else listen_port
        try:
            listeners = await open_offer_listeners(self.listen_host, wanted)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = f"port {wanted} is already in use on this machine"
            elif exc.errno == errno.EACCES:
                reason = f"port {wanted} is not allowed for this user"
            elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
                raise NoSuchAddress(
                    f"cannot take payments at {self.listen_host}: this machine has no such "
                    "address; choose another --listen-host"
                ) from None
            else:
                reason = f"cannot listen on port {wanted}: {exc.strerror or exc}"
            raise PortUnavailable(f"{reason}; choose another port for payments") from None
        port = listeners[0].socket.getsockname()[1]
        key = PeerKey()
        try:
            client = await self._server()
            result = await client.login(name, password, port, key.csr(name))
            self.known_balance = result.balance
            self._tell_news(result)
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
        self.listener = OfferListener(
            identity, self._decide, self.peer_config, on_not_settled=self._not_settled
        )
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

    def stop_listening(self) -> None:
        """Stop taking offers, staying logged in (payers then get ``unreachable``)."""
        if self._listener_scope is not None:
            self._listener_scope.cancel()
            self._listener_scope = None

    async def _stop_peering(self) -> None:
        self.stop_listening()
        if self.dialer is not None:
            await self.dialer.aclose()
        self.dialer = self.listener = self.identity = None
        self._key = None
        self.p2p_port = None

    async def _close(self) -> None:
        self._closing = True
        if self._credentials is not None:
            try:
                await self.logout()
            except ClientError:
                pass
        await self._stop_peering()
        if self._client_scope is not None:
            self._client_scope.cancel()

    # -- money --

    async def deposit(self, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        """Deposit once: a lost connection is retried with the same deposit id (made here
        if not given), which the server applies at most once."""
        did = deposit_id or uuid.uuid4()
        self.known_balance = await self._retrying(
            f"deposit {did}", lambda c: c.deposit(amount, did)
        )
        return self.known_balance

    async def _retrying(self, what: str, fn: Callable[[Client], Awaitable[T]]) -> T:
        """``fn`` on the server connection, reconnecting and calling again (at most
        SETTLE_ATTEMPTS times) when the connection is lost: only for idempotent calls."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                return await fn(await self._server())
            except (ConnectionLost, OSError) as exc:
                if attempt == SETTLE_ATTEMPTS:
                    raise
                log.info("%s: %s; reconnecting (try %d)", what, exc, attempt)
                await trio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    # -- payment requests, receipts, password --

    async def request(
        self, payer: str, amount: int, memo: str | None = None, expires_in: int | None = None
    ) -> p.RequestInfo:
        return await self._call(lambda c: c.request(payer, amount, memo, expires_in))

    async def requests(self) -> p.RequestsResult:
        return await self._call(lambda c: c.requests())

    async def pay_request(self, request_id: uuid.UUID) -> p.SettleResult:
        """Pay a request made to us, once (retried with the same id if the connection drops:
        the request id is the payment id)."""
        if self.user is None:
            raise PaymentFailed(Outcome.NOT_LOGGED_IN, "log in first")
        try:
            result = await self._retrying(
                f"request {request_id}", lambda c: c.pay_request(request_id)
            )
        except ServerError as exc:
            raise PaymentFailed(Outcome.from_server(exc.code), exc.message) from None
        except (ConnectionLost, OSError) as exc:
            raise PaymentFailed(
                Outcome.SERVER_UNREACHABLE,
                f"could not reach the server to pay request {request_id}; retry it",
            ) from exc
        self.known_balance = result.balance
        return result

    async def decline_request(self, request_id: uuid.UUID) -> p.RequestInfo:
        return await self._call(lambda c: c.decline_request(request_id))

    async def cancel_request(self, request_id: uuid.UUID) -> p.RequestInfo:
        return await self._call(lambda c: c.cancel_request(request_id))

    async def receipt(self, payment_id: uuid.UUID) -> p.Receipt:
        return await self._call(lambda c: c.receipt(payment_id))

    async def passwd(self, old_password: str, new_password: str) -> None:
        """Change our password; logging in again after a lost connection then uses the new."""
        await self._call(lambda c: c.passwd(old_password, new_password))
        if self._credentials is not None:
            self._credentials = (self._credentials[0], new_password)

    async def list(self) -> p.ListResult:
        result = await self._call(lambda c: c.list())
        self.known_balance = result.balance
        return result

    async def balance(self) -> int:
        return (await self.list()).balance

    async def history(self, limit: int = 50) -> builtins.list[p.HistoryEntry]:
        return await self._call(lambda c: c.history(limit))

    async def history_page(
        self,
        limit: int = 50,
        *,
        before: int | None = None,
        counterparty: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> p.HistoryResult:
        """One page of history, newest first; its ``next`` is the ``before`` of the next."""
        return await self._call(
            lambda c: c.history_page(
                limit,
                before=before,
                counterparty=counterparty,
                since_ms=since_ms,
                until_ms=until_ms,
            )
        )

    async def payment_status(self, payment_id: uuid.UUID) -> p.PaymentStatusResult:
        return await self._call(lambda c: c.payment_status(payment_id))

    async def pay(
        self,
        payee: str,
        amount: int,
        payment_id: uuid.UUID | None = None,
        *,
        on_offer: Callable[[p.Offer], None] | None = None,
        memo: str | None = None,
        new_id: bool = False,
    ) -> p.SettleResult:
        """Pay ``payee`` directly: offer, their signed acceptance, then settlement (once).

        With a ``payment_id`` this is safe to repeat (after ``server_unreachable``, say): if
        that payment is settled already, its first outcome is returned and nothing moves (the
        payee is not asked again); the id of a different payment is ``payment_id_conflict``.
        ``new_id``: the caller has just made ``payment_id`` up (to name it in every outcome),
        so the server is not asked whether it was settled before.

        ``on_offer`` is called as the offer goes to the payee (after every check that can
        refuse the payment without asking them, and once a secure connection is there)."""
        me = self.user
        if me is None or self.dialer is None:
            raise PaymentFailed(Outcome.NOT_LOGGED_IN, "log in first")
        if not is_amount(amount):
            raise PaymentFailed(
                Outcome.BAD_AMOUNT, f"the amount must be a positive whole number: {amount!r}"
            )
        if name_key(payee) == name_key(me):
            raise PaymentFailed(Outcome.SELF_PAYMENT, "you cannot pay yourself")
        if memo is not None and (problem := memo_problem(memo)) is not None:
            raise PaymentFailed(Outcome.BAD_MEMO, problem)
        if payment_id is not None and not new_id:
            settled = await self._settled_before(payment_id, me, payee, amount, memo)
            if settled is not None:
                return settled
        if self.known_balance is not None and amount > self.known_balance:
            # Do not bother the payee with an offer we cannot pay (the server still decides:
            # this is only asked when our last known balance says it is short).
            balance = await self.balance()
            if amount > balance:
                raise PaymentFailed(
                    Outcome.INSUFFICIENT_FUNDS, f"your balance {balance} is less than {amount}"
                )
        # An open link to the payee says where they are: the offer goes out on it without
        # asking the server (one round trip of three). If it has closed since (they logged
        # out, or in again elsewhere, or lost the server), the payment asks the server.
        # (Only while we have the server: without it the payee would be asked for nothing.)
        dialer = self.dialer
        link = await dialer.linked(payee) if self._usable(self._client) else None
        if link is not None and link.where is not None:
            where = link.where
        else:
            link, where = None, await self._lookup(payee)
        # The payee's name as registered (it was typed in any letter case).
        offer = p.Offer(payment_id or uuid.uuid4(), me, where.name, amount, memo)
        told = False

        def sent(offer: p.Offer) -> None:  # (once, should the offer go out a second time)
            nonlocal told
            if not told and on_offer is not None:
                on_offer(offer)
            told = True

        try:
            try:
                answer, used = await dialer.ask(where, offer, on_sent=sent, via=link)
            except LinkBroke:
                link, where = None, await self._lookup(payee)
                answer, used = await dialer.ask(where, offer, on_sent=sent)
        except PeerError as exc:
            raise PaymentFailed(exc.code, exc.message) from None
        if isinstance(answer, p.Decline):
            why = "" if answer.reason == "declined" else f" ({answer.reason})"
            raise PaymentFailed(Outcome.DECLINED, f"{where.name} declined the payment{why}")
        try:
            result = await self._settle(offer, answer.signature)
        except PaymentFailed as exc:
            if exc.code is not Outcome.SERVER_UNREACHABLE:  # then it may yet be settled by a retry
                news = p.NotSettled(offer.payment_id, exc.message[:200])
                await dialer.tell(payee, news, used)
            if link is not None and exc.code is Outcome.BAD_ACCEPTANCE:
                # Signed with a key the server no longer has for them: the link may reach a
                # login of theirs that a newer one has just replaced. The next payment to
                # them asks the server.
                await dialer.drop(payee, used)
            raise
        self.known_balance = result.balance
        return result

    async def _lookup(self, payee: str) -> p.Presence:
        """Where the server says ``payee`` is online."""
        try:
            return await self._call(lambda c: c.lookup(payee))
        except ServerError as exc:
            raise PaymentFailed(Outcome.from_server(exc.code), exc.message) from None

    async def _settled_before(
        self, payment_id: uuid.UUID, me: str, payee: str, amount: int, memo: str | None
    ) -> p.SettleResult | None:
        """The stored outcome if ``payment_id`` is settled already as this very payment; None
        if it is not settled (then it is paid as a new one, with that id)."""
        try:
            status = await self._call(lambda c: c.payment_status(payment_id))
        except ServerError as exc:
            if exc.code == p.ErrorCode.UNKNOWN_OP:
                return None  # an older server: its settle still pays at most once
            raise PaymentFailed(Outcome.from_server(exc.code), exc.message) from None
        except (ConnectionLost, OSError) as exc:
            raise PaymentFailed(
                Outcome.SERVER_UNREACHABLE,
                f"could not reach the server to check payment {payment_id}: {exc}",
            ) from None
        if not status.settled:
            return None
        assert status.payer is not None and status.payee is not None
        # (the memo is part of the payment, as the server's settle compares it)
        if (name_key(status.payer), name_key(status.payee), status.amount, status.memo) != (
            name_key(me),
            name_key(payee),
            amount,
            memo,
        ):
            raise PaymentFailed(
                Outcome.PAYMENT_ID_CONFLICT,
                f"payment {payment_id} was settled before as another payment",
            )
        assert status.amount is not None and status.balance is not None
        return p.SettleResult(
            payment_id, status.payer, status.payee, status.amount, status.balance, status.memo
        )

    async def _settle(self, offer: p.Offer, acceptance: str) -> p.SettleResult:
        """Settle, retrying with the same payment id across lost connections: at most once."""
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                client = await self._server()
                return await client.settle(
                    offer.payment_id, offer.payee, offer.amount, acceptance, offer.memo
                )
            except ServerError as exc:
                raise PaymentFailed(Outcome.from_server(exc.code), exc.message) from None
            except (ConnectionLost, OSError) as exc:
                if attempt == SETTLE_ATTEMPTS:
                    raise PaymentFailed(
                        Outcome.SERVER_UNREACHABLE,
                        f"could not reach the server to settle {offer.payment_id}; "
                        "retry with the same payment id",
                    ) from exc
                log.info("settle %s: %s; reconnecting (try %d)", offer.payment_id, exc, attempt)
                await trio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")
