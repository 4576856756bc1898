"""The server: owns every client connection, who is online, and the order of shutdown.

One nursery owns the listeners' accept loops and one task per connection. Each connection is
a :class:`Session`: TLS handshake with a timeout, then requests answered one at a time through
the sans-I/O :class:`~p2ppay.protocol.ServerConnection`, money moved only through the
:class:`~p2ppay.ledger.Ledger`. Sessions never parse bytes and never write SQL.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import logging
import math
import os
import signal
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, final

import trio
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from . import __version__, logs
from . import ledger as lg
from . import protocol as p
from .course import REFERENCE, Dialect
from .course_session import CourseSession
from .hashing import Hasher
from .limits import LimitLog, LoginThrottle, ThrottleConfig
from .metrics import ServerMetrics, serve_metrics
from .passwords import ScryptParams, hash_password, verify_password
from .pki import (
    IdentityError,
    Issuer,
    PeerCertificate,
    ensure_server_credentials,
    load_public_key_der,
    public_key_der,
    public_key_line,
    verify_acceptance,
)
from .sending import Outgoing
from .tls import server_context

log = logging.getLogger("p2ppay.server")

DEFAULT_PORT: Final = 8700

#: who may bring money in: every user (``deposit``), or only the operator (``admin credit``)
DepositPolicy = Literal["open", "operator"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every limit the server enforces. All of them are settable from the command line."""

    max_line: int = p.DEFAULT_MAX_LINE
    receive_size: int = 16 * 1024
    handshake_timeout: float = 10.0
    #: a connection that has not logged in is closed after this long without a request
    anonymous_idle_timeout: float = 60.0
    #: a peer that does not take our bytes for this long is disconnected
    write_timeout: float = 10.0
    #: on SIGTERM, how long in-flight requests may take before connections are cut
    shutdown_grace: float = 10.0
    max_list: int = 1000
    #: threads for password hashing: all cores but one, which stays the event loop's
    hash_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    #: how long a session's peer certificate is valid
    peer_cert_lifetime: float = 24 * 3600.0
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    #: connections at once, in all and from one address (those in the TLS handshake count)
    max_connections: int = 20_000
    max_connections_per_ip: int = 256
    #: what a new course account starts with (recorded as a deposit)
    course_initial_balance: int = 10_000
    course_max_message: int = 1024
    #: a course connection that has not logged in is closed after this long without a message
    #: (math.inf: never). Not anonymous_idle_timeout: course clients connect at start-up and
    #: then wait for their person.
    course_idle_timeout: float = 4 * 3600.0
    scrypt: ScryptParams = field(default_factory=ScryptParams)
    #: "operator": users' deposits are refused (and course accounts start empty)
    deposits: DepositPolicy = "open"


class RequestFailed(Exception):
    """A request is answered with an error; the session goes on."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_LEDGER_CODES: Final[dict[type[lg.LedgerError], p.ErrorCode]] = {
    lg.NameTaken: p.ErrorCode.NAME_TAKEN,
    lg.UnknownAccount: p.ErrorCode.UNKNOWN_USER,
    lg.UnknownPayee: p.ErrorCode.UNKNOWN_PAYEE,
    lg.AmountOutOfRange: p.ErrorCode.BAD_AMOUNT,
    lg.BalanceLimit: p.ErrorCode.BALANCE_LIMIT,
    lg.InsufficientFunds: p.ErrorCode.INSUFFICIENT_FUNDS,
    lg.SelfPayment: p.ErrorCode.SELF_PAYMENT,
    lg.PaymentIdConflict: p.ErrorCode.PAYMENT_ID_CONFLICT,
    lg.Unauthorized: p.ErrorCode.BAD_ACCEPTANCE,
    lg.AccountFrozen: p.ErrorCode.ACCOUNT_FROZEN,
    lg.LedgerUnavailable: p.ErrorCode.INTERNAL,
}


def _peer_port(stream: trio.abc.Stream) -> int:
    sock = getattr(stream, "socket", None)
    try:
        return int(sock.getpeername()[1]) if sock is not None else 0
    except (OSError, IndexError, TypeError, ValueError):
        return 0


def _peer_ip(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "unknown"
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "unknown"


@final
class Server:
    """Presence, sessions and shutdown for one ledger. Transport-agnostic: tests hand it memory
    streams through :meth:`handle_connection`, the real listener hands it TCP streams."""

    def __init__(
        self,
        ledger: lg.Ledger,
        ssl_context: ssl.SSLContext,
        issuer: Issuer,
        config: ServerConfig | None = None,
        *,
        server_public_key: str = "",
        course_tls: bool = False,
        course_dialect: Dialect = REFERENCE,
    ) -> None:
        self.ledger = ledger
        self.ssl_context = ssl_context
        self.issuer = issuer
        self.config = config or ServerConfig()
        # name -> (public key, expiry in ms) certified for the account's current session;
        # a cache of what the ledger stores, filled at login and on first use.
        self._peer_keys: dict[str, tuple[EllipticCurvePublicKey, int]] = {}
        self.online: dict[str, Session] = {}
        self.course_online: dict[str, CourseSession] = {}
        self.sessions: set[Session | CourseSession] = set()
        #: the course dialect's login reply names this (base64 DER of the server's key)
        self.server_public_key = server_public_key
        self.course_tls = course_tls
        #: the flavour of the course dialect the course listener speaks
        self.course_dialect = course_dialect
        self._hasher: Hasher | None = None  # its threads run while serve() does
        # A hash to check against when the account does not exist, so that a missing account
        # costs the same time as a wrong password. Made lazily (it is slow).
        self._dummy_hash: str | None = None
        self.throttle = LoginThrottle(self.config.throttle, trio.current_time)
        self.limit_log = LimitLog(log)
        self.connections_per_ip: dict[str, int] = {}
        self.connections = 0
        self.closing = False
        self._nursery: trio.Nursery | None = None
        self._accept_scope = trio.CancelScope()
        self._drained = trio.Event()
        self.metrics = ServerMetrics(self)

    # -- connections --

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        course_listeners: Sequence[trio.abc.Listener[Any]] = (),
        *,
        task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` (and the course dialect on ``course_listeners``) until
        :meth:`shutdown`; return when every session is done."""
        async with Hasher(self.config.hash_threads) as self._hasher, trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._accept_scope:
                async with trio.open_nursery() as accepting:
                    for group, handler in (
                        (listeners, self._on_accept),
                        (course_listeners, self._on_course_accept),
                    ):
                        if group:
                            await accepting.start(
                                partial(
                                    trio.serve_listeners,
                                    handler,
                                    list(group),
                                    handler_nursery=nursery,
                                )
                            )
                    # No listener at all is in-memory use: connections come through
                    # handle_connection() and handle_course_connection().
                    task_status.started([*listeners, *course_listeners])
                    await trio.sleep_forever()
            # Accepting has stopped: sessions finish what they are doing and leave.
            self._wake_sessions()
            with trio.move_on_after(self.config.shutdown_grace):
                if self.sessions:
                    await self._drained.wait()
            if self.sessions:
                log.warning(
                    "cutting %d connection(s) still busy after the grace period", len(self.sessions)
                )
            nursery.cancel_scope.cancel()

    async def run_in_memory(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Like :meth:`serve` with no listener: for tests that call :meth:`handle_connection`."""
        await self.serve([], [], task_status=task_status)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        """Stop accepting; let in-flight requests finish; close every connection."""
        if not self.closing:
            log.info("shutting down: no new connections, finishing in-flight requests")
        self.closing = True
        self._accept_scope.cancel()
        self._wake_sessions()

    def _wake_sessions(self) -> None:
        for session in list(self.sessions):
            session.receive_scope.cancel()

    async def _on_accept(self, stream: trio.abc.Stream) -> None:
        await self.handle_connection(stream, _peer_ip(stream))

    def _admit(self, peer_ip: str) -> bool:
        """Count a new connection in, unless it would pass a connection limit."""
        cfg = self.config
        if self.connections >= cfg.max_connections:
            self.limit_log.hit("max-connections", f"{cfg.max_connections} open; refused {peer_ip}")
            return False
        if self.connections_per_ip.get(peer_ip, 0) >= cfg.max_connections_per_ip:
            self.limit_log.hit(
                "max-connections-per-ip", f"{cfg.max_connections_per_ip} open from {peer_ip}"
            )
            return False
        self.connections += 1
        self.connections_per_ip[peer_ip] = self.connections_per_ip.get(peer_ip, 0) + 1
        return True

    def _release(self, peer_ip: str) -> None:
        self.connections -= 1
        left = self.connections_per_ip[peer_ip] - 1
        if left:
            self.connections_per_ip[peer_ip] = left
        else:
            del self.connections_per_ip[peer_ip]

    async def _handshake(
        self, transport: trio.abc.Stream, peer_ip: str
    ) -> trio.SSLStream[Any] | None:
        """TLS within the handshake timeout, or None (and the transport closed)."""
        stream = trio.SSLStream(transport, self.ssl_context, server_side=True)
        try:
            with trio.move_on_after(self.config.handshake_timeout) as scope:
                await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            # Garbage instead of TLS, a port scan, a client that does not trust us: common
            # enough to be worth a line now and then, not one per connection.
            self.limit_log.hit("tls-handshake-failed", f"{peer_ip}: {exc.__cause__ or exc}")
            await trio.aclose_forcefully(stream)
            return None
        if scope.cancelled_caught:
            self.limit_log.hit("tls-handshake-timeout", f"{peer_ip} stayed silent")
            await trio.aclose_forcefully(stream)
            return None
        return stream

    async def handle_connection(self, transport: trio.abc.Stream, peer_ip: str) -> None:
        """Own one connection from TLS handshake to close."""
        if not self._admit(peer_ip):
            await trio.aclose_forcefully(transport)
            return
        try:
            stream = await self._handshake(transport, peer_ip)
            if stream is not None:
                await self._own(Session(self, stream, peer_ip))
        finally:
            self._release(peer_ip)

    async def _on_course_accept(self, stream: trio.abc.Stream) -> None:
        await self.handle_course_connection(stream, _peer_ip(stream), _peer_port(stream))

    async def handle_course_connection(
        self, transport: trio.abc.Stream, peer_ip: str, peer_port: int = 0
    ) -> None:
        """Own one course-dialect connection (TLS first if the server was told --course-tls);
        ``peer_port`` is its source port (0: unknown)."""
        if not self._admit(peer_ip):
            await trio.aclose_forcefully(transport)
            return
        try:
            stream: trio.abc.Stream | None = transport
            if self.course_tls:
                stream = await self._handshake(transport, peer_ip)
            if stream is not None:
                await self._own(CourseSession(self, stream, peer_ip, peer_port))
        finally:
            self._release(peer_ip)

    async def _own(self, session: Session | CourseSession) -> None:
        """Run a session to its end, whatever happens in it."""
        self.sessions.add(session)
        logs.bind_connection(session)  # this task's log lines carry its peer and user
        log.info("%s: connected%s", session.ip, " (course)" if session.course else "")
        try:
            await session.run()
        except Exception:
            # A bug in one session must not take the server down with it.
            log.exception("%s: internal error; connection closed", session.ip)
        finally:
            self.sessions.discard(session)
            self._forget(session)
            if self.closing and not self.sessions:
                self._drained.set()
            log.info("%s: disconnected%s", session.ip, f" ({session.user})" if session.user else "")

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a short background job (an event delivery) under the server's nursery."""
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    # -- presence --

    def _forget(self, session: Session | CourseSession) -> None:
        online: dict[str, Any] = self.course_online if session.course else self.online
        if session.user is not None and online.get(session.user) is session:
            del online[session.user]

    def take_over(self, session: Session, name: str) -> None:
        """Make ``session`` the online session of ``name``; an older one is told and closed."""
        old = self.online.get(name)
        self.online[name] = session
        if old is not None and old is not session:
            log.info(
                "%s: %s logged in again from %s; closing the old session", old.ip, name, session.ip
            )
            old.close_after(p.SessionReplaced(f"{name} logged in from {session.ip}"))

    async def certify(self, name: str, csr: str) -> PeerCertificate:
        """Issue ``name`` a peer certificate for the CSR's key; it replaces any earlier one."""
        lifetime = dt.timedelta(seconds=self.config.peer_cert_lifetime)
        try:
            cert = self.issuer.issue(csr, name, lifetime)
        except IdentityError as exc:
            raise RequestFailed(p.ErrorCode.BAD_CSR, str(exc)) from None
        expires_ms = int(cert.not_after.timestamp() * 1000)
        await self.ledger.set_peer_key(name, public_key_der(cert.public_key), expires_ms)
        self._peer_keys[name] = (cert.public_key, expires_ms)
        return cert

    async def acceptance_check(
        self, payment_id: uuid.UUID, payer: str, payee: str, amount: int, acceptance: str
    ) -> lg.Authorize:
        """What the ledger calls to authorise a new payment: is ``acceptance`` the payee's
        signature over this very payment, made with the key certified for the payee's current
        session? (The check itself runs in the ledger's thread, off the event loop.)"""
        cached = self._peer_keys.get(payee)
        if cached is None:
            account = await self.ledger.account(payee)
            if account is None or account.kind != "native" or account.peer_key is None:
                return lambda: f"{payee} has no peer key to accept with"
            expires = account.peer_key_expires_ms or 0
            cached = self._peer_keys[payee] = (load_public_key_der(account.peer_key), expires)
        key, expires_ms = cached
        if expires_ms < time.time() * 1000:
            return lambda: f"{payee}'s certificate has expired"
        try:
            signature = base64.b64decode(acceptance, validate=True)
        except ValueError:
            return lambda: "the acceptance is not base64"

        def check() -> str | None:
            if verify_acceptance(key, signature, str(payment_id), payer, payee, amount):
                return None
            return f"the acceptance is not {payee}'s signature over this payment"

        return check

    def is_current(self, session: Session) -> bool:
        return session.user is not None and self.online.get(session.user) is session

    # -- password hashing (on low-priority threads, never on the event loop) --

    async def hash_password(self, password: str) -> str:
        assert self._hasher is not None, "serve() runs the hashing threads"
        digest: str = await self._hasher.run(partial(hash_password, password, self.config.scrypt))
        return digest

    async def verify_password(self, password: str, stored: str | None) -> bool:
        assert self._hasher is not None, "serve() runs the hashing threads"
        if stored is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash_password("no such account")
            await self._hasher.run(partial(verify_password, password, self._dummy_hash))
            return False
        ok: bool = await self._hasher.run(partial(verify_password, password, stored))
        return ok


@final
class Session:
    """One client connection: reads requests, answers them in order, and takes pushed events."""

    course: Final = False

    def __init__(self, server: Server, stream: trio.SSLStream[trio.abc.Stream], ip: str) -> None:
        self.server = server
        self.stream = stream
        self.ip = ip
        self.conn = p.ServerConnection(server.config.max_line)
        self.user: str | None = None
        self.p2p_port: int | None = None
        self.cancel_scope = trio.CancelScope()
        self.receive_scope = trio.CancelScope()  # cancelled to stop reading at shutdown
        self._out = Outgoing(stream)
        self._handlers: dict[str, Callable[[Any], Awaitable[p.Result]]] = {
            "hello": self._hello,
            "register": self._register,
            "login": self._login,
            "deposit": self._deposit,
            "list": self._list,
            "lookup": self._lookup,
            "settle": self._settle,
            "history": self._history,
            "logout": self._logout,
        }

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                await self._serve_requests()
        except trio.BrokenResourceError:
            log.info("%s: connection lost", self.ip)
        except trio.ClosedResourceError:
            pass
        finally:
            self.server._forget(self)
            with trio.CancelScope(shield=True):
                await self._close_stream()

    async def _close_stream(self) -> None:
        # A polite close (TLS close_notify) only if nobody is writing and the peer takes it
        # promptly; otherwise drop the transport.
        if self.cancel_scope.cancel_called or self._out.busy:
            await trio.aclose_forcefully(self.stream)
            return
        with trio.move_on_after(1) as scope:
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    async def _serve_requests(self) -> None:
        cfg = self.server.config
        while True:
            if self.server.closing:
                await self._refuse_buffered_requests()
                await self.send(
                    self.conn.send_event(p.ServerClosing("the server is shutting down"))
                )
                return
            try:
                event = self.conn.next_event()
            except p.RemoteProtocolError as exc:
                log.info("%s: protocol error: %s", self.ip, exc)
                await self.send(self.conn.send_error(None, exc.code, exc.message))
                return
            if event is p.NEED_DATA:
                data: bytes | bytearray | None = None
                # A fresh scope per read: shutdown cancels it to stop reading, and its deadline
                # is the idle timeout of a connection that has not logged in.
                scope = self.receive_scope = trio.CancelScope()
                if self.user is None:
                    scope.deadline = trio.current_time() + cfg.anonymous_idle_timeout
                with scope:
                    data = await self.stream.receive_some(cfg.receive_size)
                if data is None:
                    if not self.server.closing:
                        self.server.limit_log.hit(
                            "idle-timeout",
                            f"{self.ip}: {cfg.anonymous_idle_timeout:.0f} s without logging in",
                        )
                        return
                    continue  # woken for shutdown; the loop's first check ends the session
                self.conn.receive_data(data)
            elif event is p.CLOSED:
                return
            elif isinstance(event, p.Rejected):
                log.debug("%s: rejected request: %s", self.ip, event.message)
                await self.send(self.conn.send_error(event.id, event.code, event.message))
            else:
                assert not isinstance(event, p.Sentinel)
                await self.send(await self._answer(event))

    async def _refuse_buffered_requests(self) -> None:
        """At shutdown, tell the client which of its already-sent requests were not done."""
        out = bytearray()
        while True:
            try:
                event = self.conn.next_event()
            except p.RemoteProtocolError:
                break
            if isinstance(event, p.Sentinel):
                break
            out += self.conn.send_error(
                event.id, p.ErrorCode.SHUTTING_DOWN, "the server is shutting down; not done"
            )
        if out:
            await self.send(bytes(out))

    async def _answer(self, request: p.Request) -> bytes:
        op = p.op_of(request)
        log.debug("%s: %s %s", self.ip, self.user or "-", op)
        if self.conn.state is p.State.AUTHENTICATED and not self.server.is_current(self):
            return self.conn.send_error(
                request.id, p.ErrorCode.NOT_LOGGED_IN, "this session was replaced by a newer login"
            )
        try:
            result = await self._handlers[op](request)
        except RequestFailed as exc:
            self.server.metrics.request_failed(op, exc.code)
            return self.conn.send_error(request.id, exc.code, exc.message)
        except lg.LedgerError as exc:
            code = _LEDGER_CODES.get(type(exc), p.ErrorCode.INTERNAL)
            self.server.metrics.request_failed(op, code)
            if code is p.ErrorCode.INTERNAL:
                log.error("%s: ledger failure on %s: %s", self.ip, op, exc)
                return self.conn.send_error(request.id, code, "the ledger is unavailable")
            return self.conn.send_error(request.id, code, str(exc))
        return self.conn.send_ok(request, result)

    # -- output --

    async def send(self, data: bytes) -> None:
        """Write one message; a peer that will not take it within the write timeout is dropped."""
        with trio.move_on_after(self.server.config.write_timeout) as scope:
            await self._out.send(data)
        if scope.cancelled_caught:
            self.server.limit_log.hit("write-timeout", f"{self.ip} stopped reading; dropped")
            self.cancel_scope.cancel()

    def push(self, event: p.Event) -> None:
        """Deliver an event without making the caller wait for this peer."""
        if self.conn.state is not p.State.AUTHENTICATED:
            return
        data = self.conn.send_event(event)

        async def deliver() -> None:
            logs.bind_connection(self)  # spawned by another session's task: about this one
            try:
                await self.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.server.metrics.event_dropped()

        self.server.spawn(deliver)

    def close_after(self, event: p.Event) -> None:
        """Send ``event`` (best effort) and then close this session."""
        data = p.encode_event(event)

        async def deliver_and_close() -> None:
            logs.bind_connection(self)  # spawned by another session's task: about this one
            try:
                await self.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            self.cancel_scope.cancel()

        self.server.spawn(deliver_and_close)

    # -- one handler per op --

    async def _hello(self, req: p.Hello) -> p.HelloResult:
        if req.version != p.PROTOCOL_VERSION:
            raise RequestFailed(
                p.ErrorCode.UNSUPPORTED_VERSION, f"this server speaks version {p.PROTOCOL_VERSION}"
            )
        return p.HelloResult(p.PROTOCOL_VERSION, f"p2ppay/{__version__}")

    async def _register(self, req: p.Register) -> p.RegisterResult:
        ledger = self.server.ledger
        if await ledger.account(req.name) is not None:  # cheap check before the slow hash
            raise RequestFailed(p.ErrorCode.NAME_TAKEN, f"the name {req.name!r} is taken")
        digest = await self.server.hash_password(req.password)
        await ledger.create_account(req.name, digest)
        log.info("%s: registered %s", self.ip, req.name)
        return p.RegisterResult(req.name)

    async def _login(self, req: p.Login) -> p.LoginResult:
        throttle = self.server.throttle
        wait = throttle.retry_after(req.name, self.ip)
        if wait is not None:
            self.server.limit_log.hit("login-throttle", f"{req.name} from {self.ip}")
            raise RequestFailed(
                p.ErrorCode.RATE_LIMITED,
                f"too many failed logins; try again in {math.ceil(wait)} s",
            )
        account = await self.server.ledger.account(req.name)
        stored = account.password_hash if account and account.kind == "native" else None
        # A missing account costs the same hashing as a wrong password, and gets the same
        # answer: a login does not tell whether a name exists.
        ok = await self.server.verify_password(req.password, stored)
        if account is None or stored is None or not ok:
            throttle.failed(req.name, self.ip)
            raise RequestFailed(p.ErrorCode.AUTH_FAILED, "unknown user or wrong password")
        throttle.succeeded(req.name)
        cert = await self.server.certify(req.name, req.csr) if req.csr else None
        await self.server.ledger.record_login(req.name)  # before anything here changes
        self.user = req.name
        self.p2p_port = req.p2p_port
        self.server.take_over(self, req.name)
        log.info("%s: %s logged in (p2p port %s)", self.ip, req.name, req.p2p_port)
        return p.LoginResult(
            req.name,
            account.balance,
            self.ip,
            req.p2p_port,
            cert.pem if cert else None,
            self.server.issuer.ca_pem if cert else None,
        )

    def _me(self) -> str:
        assert self.user is not None
        return self.user

    async def _deposit(self, req: p.Deposit) -> p.BalanceResult:
        if self.server.config.deposits == "operator":
            raise RequestFailed(
                p.ErrorCode.DEPOSITS_CLOSED, "on this server only the operator brings money in"
            )
        return p.BalanceResult(await self.server.ledger.deposit(self._me(), req.amount))

    async def _list(self, req: p.ListOnline) -> p.ListResult:
        account = await self.server.ledger.account(self._me())
        balance = account.balance if account else 0
        online = sorted(self.server.online.items())[: self.server.config.max_list]
        return p.ListResult(balance, [p.Presence(n, s.ip, s.p2p_port) for n, s in online])

    async def _lookup(self, req: p.Lookup) -> p.Presence:
        session = self.server.online.get(req.name)
        if session is not None:
            return p.Presence(req.name, session.ip, session.p2p_port)
        account = await self.server.ledger.account(req.name)
        if account is None:
            raise RequestFailed(p.ErrorCode.UNKNOWN_USER, f"no account named {req.name!r}")
        raise RequestFailed(p.ErrorCode.PAYEE_OFFLINE, f"{req.name} is not online")

    async def _settle(self, req: p.Settle) -> p.SettleResult:
        # The payer is always this session's own account: nobody moves money out of another's.
        payer = self._me()
        if req.payee == payer:
            raise RequestFailed(p.ErrorCode.SELF_PAYMENT, "you cannot pay yourself")
        # The ledger authorises only a new payment: a retry of one settled before (perhaps
        # before the payee's key changed) gets its stored outcome.
        authorize = await self.server.acceptance_check(
            req.payment_id, payer, req.payee, req.amount, req.acceptance
        )
        t = await self.server.ledger.settle(req.payment_id, payer, req.payee, req.amount, authorize)
        if not t.replayed:
            log.debug(
                "%s: settled %s: %s -> %s %d",
                self.ip,
                t.payment_id,
                t.payer,
                t.payee,
                t.amount,
                extra={"payment_id": str(t.payment_id)},
            )
            payee = self.server.online.get(t.payee)
            if payee is not None:
                payee.push(p.PaymentReceived(t.payment_id, t.payer, t.amount, t.payee_balance))
        return p.SettleResult(t.payment_id, t.payer, t.payee, t.amount, t.payer_balance)

    async def _history(self, req: p.History) -> p.HistoryResult:
        entries = await self.server.ledger.history(self._me(), req.limit)
        return p.HistoryResult(
            [
                p.HistoryEntry(e.kind, e.amount, e.balance, e.at_ms, e.counterparty, e.payment_id)
                for e in entries
            ]
        )

    async def _logout(self, req: p.Logout) -> p.LogoutResult:
        log.info("%s: %s logged out", self.ip, self.user)
        self.server._forget(self)
        self.user = None
        self.p2p_port = None
        return p.LogoutResult()


# --------------------------------------------------------------------------------------------
# Running a real server
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str | None = None  # None: every interface
    port: int = DEFAULT_PORT
    state_dir: Path = Path(".")
    cert: Path | None = None
    key: Path | None = None
    sans: tuple[str, ...] = ()
    limits: lg.Limits = field(default_factory=lg.Limits)
    config: ServerConfig = field(default_factory=ServerConfig)
    max_batch: int = 512
    course_port: int | None = None  # None: no course-dialect listener
    course_tls: bool = False
    course_dialect: Dialect = REFERENCE
    metrics_port: int | None = None  # None: no metrics listener
    metrics_host: str = "127.0.0.1"


LEDGER_FILE: Final = "ledger.sqlite3"


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state directory if needed and check that we can write there and to the
    ledger: a clear error now rather than a traceback from deep inside SQLite or the CA code."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StartupError(f"the state directory {state_dir} is not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(
            f"cannot create the state directory {state_dir}: {exc.strerror or exc}"
        ) from None
    probe = state_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"cannot write in the state directory {state_dir}: {exc.strerror}"
        ) from None
    for name in (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm"):
        path = state_dir / name
        if path.exists():
            try:
                with path.open("r+b"):
                    pass
            except OSError as exc:
                raise StartupError(f"cannot write the ledger file {path}: {exc.strerror}") from None


async def _bind(port: int, host: str | None) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"port {port}" if host is None else f"{host} port {port}"
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"{where} is already in use") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"{where} is not allowed for this user") from None
        raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from None


async def run_server(
    options: ServerOptions,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until shut down (by SIGINT/SIGTERM if ``handle_signals``); started() gets addresses
    (the native listeners' first, then the course dialect's)."""
    state_dir = options.state_dir
    await trio.to_thread.run_sync(prepare_state_dir, state_dir)
    if options.cert and options.key:
        cert_path: Path = options.cert
        try:
            ctx = server_context(options.cert, options.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = (
                "they are not a PEM certificate chain and its private key"
                if isinstance(exc, ssl.SSLError)
                else getattr(exc, "strerror", None) or exc
            )
            raise StartupError(
                f"cannot use --cert {options.cert} with --key {options.key}: {reason}"
            ) from None
    elif options.cert or options.key:
        raise StartupError("--cert and --key go together")
    else:
        creds = await trio.to_thread.run_sync(ensure_server_credentials, state_dir, options.sans)
        cert_path = creds.cert_chain
        ctx = server_context(creds.cert_chain, creds.key)
    issuer = await trio.to_thread.run_sync(Issuer.ensure, state_dir)
    key_line = public_key_line(await trio.Path(cert_path).read_bytes())

    # Bind first: a port in use is reported before anything is created or opened.
    listeners = await _bind(options.port, options.host)
    course_listeners: list[trio.SocketListener] = []
    metrics_listeners: list[trio.SocketListener] = []
    try:
        if options.course_port is not None:
            course_listeners = await _bind(options.course_port, options.host)
        if options.metrics_port is not None:
            metrics_listeners = await _bind(options.metrics_port, options.metrics_host)
        async with lg.open_sqlite_ledger(
            state_dir / LEDGER_FILE, options.limits, max_batch=options.max_batch
        ) as ledger:
            server = Server(
                ledger,
                ctx,
                issuer,
                options.config,
                server_public_key=key_line,
                course_tls=options.course_tls,
                course_dialect=options.course_dialect,
            )
            ledger.observer = server.metrics
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners, course_listeners)
                if metrics_listeners:  # in the server's nursery: it stops when serving does
                    server.spawn(partial(serve_metrics, server.metrics.render, metrics_listeners))
                addresses: list[tuple[str, int]] = []
                for group, what in ((listeners, "TLS"), (course_listeners, "course dialect")):
                    if what != "TLS":
                        what = f"course dialect, {options.course_dialect.name} flavour"
                        if options.course_tls:
                            what += ", over TLS"
                    for listener in group:
                        host, port = listener.socket.getsockname()[:2]
                        addresses.append((str(host), int(port)))
                        log.info("listening on %s port %d (%s)", host, port, what)
                for listener in metrics_listeners:
                    host, port = listener.socket.getsockname()[:2]
                    log.info("listening on %s port %d (metrics, HTTP: /metrics)", host, port)
                task_status.started(addresses)
                if handle_signals:
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            log.info("received %s", signal.Signals(signum).name)
                            server.shutdown()
                            break
        log.info(
            "ledger: %d commits, %d operations (%.1f per commit)",
            ledger.commits,
            ledger.ops_committed,
            ledger.ops_committed / max(ledger.commits, 1),
        )
    finally:
        # serve() and serve_metrics() closed those they started
        for listener in [*listeners, *course_listeners, *metrics_listeners]:
            with trio.CancelScope(shield=True):
                await listener.aclose()
    log.info("stopped")
