"""The server: owns every connection (one task each, in one nursery), and the order of shutdown.

Transport-agnostic: tests hand it memory streams through :meth:`Server.handle_connection`, the
real listeners hand it TCP streams. Admission (limits, TLS), who is online, who someone is, and
each dialect's session are modules of their own; this one wires them together.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, final

import trio

from p2ppay import ledger as lg
from p2ppay import logs
from p2ppay import wire as p
from p2ppay.accepting import PatientListener
from p2ppay.logs import LimitLog
from p2ppay.pki import Issuer, create_ca
from p2ppay.presence.local import LocalPresence, Presence
from p2ppay.presence.postgres import PgPresence
from p2ppay.receipts import ReceiptSigner
from p2ppay.server.accounts import Accounts
from p2ppay.server.addresses import peer_ip, peer_port
from p2ppay.server.admission import Admission
from p2ppay.server.config import ServerConfig
from p2ppay.server.hashing import Work
from p2ppay.server.metrics import ServerMetrics
from p2ppay.server.sessions.base import SessionBase
from p2ppay.server.sessions.course import CourseSession
from p2ppay.server.sessions.native import Session
from p2ppay.server.throttle import RequestLimit
from p2ppay.wire.course import REFERENCE, Dialect
from p2ppay.wire.names import name_key

log = logging.getLogger("p2ppay.server")


@final
class Server:
    """Sessions, presence and shutdown for one ledger."""

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
        hash_work: Work | None = None,
        wall_clock: Callable[[], float] = time.time,
        presence: Presence | None = None,
        receipts: ReceiptSigner | None = None,
    ) -> None:
        """``presence``: who is online (default: this process only; several nodes share a
        :class:`~.pg_presence.PgPresence`)."""
        self.ledger = ledger
        #: signs receipts (without one: a throwaway signer, for tests that do not check them)
        self.receipts = receipts or ReceiptSigner.ephemeral(create_ca("p2ppay throwaway CA"))
        self.config = cfg = config or ServerConfig()
        self.limit_log = LimitLog(log, clock=trio.current_time)
        self.request_limit = RequestLimit(cfg.request_limits, trio.current_time)
        self.admission = Admission(
            ssl_context,
            self.limit_log,
            max_connections=cfg.max_connections,
            max_per_ip=cfg.max_connections_per_ip,
            handshake_timeout=cfg.handshake_timeout,
        )
        # wall_clock: what peer certificates' expiry is checked against (tests move it)
        self.accounts = Accounts(
            ledger, issuer, cfg, self.limit_log, hash_work=hash_work, wall_clock=wall_clock
        )
        self.presence: Presence = presence if presence is not None else LocalPresence()
        if isinstance(presence, PgPresence):  # a login elsewhere may have changed a key
            presence.logged_in_elsewhere = self.accounts.forget_peer_key
            presence.delivered = self._delivered
        self.sessions: set[SessionBase] = set()
        #: the course dialect's login reply names this (base64 DER of the server's key)
        self.server_public_key = server_public_key
        self.course_tls = course_tls
        #: the flavour of the course dialect the course listener speaks
        self.course_dialect = course_dialect
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self._accept_scope = trio.CancelScope()
        self._drained = trio.Event()
        self.metrics = ServerMetrics(self)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- what the metrics read --

    def connections_open(self) -> int:
        return self.admission.connections

    def sessions_logged_in(self, course: bool) -> int:
        return len(self.presence.names(course=course))

    def hash_jobs_waiting(self) -> int:
        return self.accounts.hash_jobs_waiting()

    # -- running --

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        course_listeners: Sequence[trio.abc.Listener[Any]] = (),
        *,
        task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` (and the course dialect on ``course_listeners``) until
        :meth:`shutdown`; return when every session is done."""
        async with self.accounts.running(), trio.open_nursery() as nursery:
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
                                    [self._patient(listener) for listener in group],
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

    def _patient(self, listener: trio.abc.Listener[Any]) -> PatientListener[Any]:
        """``listener``, with a full file table waited out in one log line a minute."""
        return PatientListener(
            listener,
            self.limit_log,
            "raise the open-file limit, ulimit -n, or lower --max-connections",
        )

    def shutdown(self) -> None:
        """Stop accepting; let in-flight requests finish; close every connection."""
        if not self._closing:
            log.info("shutting down: no new connections, finishing in-flight requests")
        self._closing = True
        self._accept_scope.cancel()
        self._wake_sessions()

    def _wake_sessions(self) -> None:
        for session in list(self.sessions):
            session.wake()

    def _delivered(self, name: str, event: p.Event) -> None:
        """An event from another node reached ``name`` here. A requester told that its
        request was paid or declined needs no ``request_news`` of it at its next login (the
        node that closed the request could not know it arrived)."""
        if not isinstance(event, p.RequestClosed):
            return
        request = event.request
        if name_key(request.requester) != name_key(name) or request.state == "cancelled":
            return

        async def told() -> None:
            try:
                await self.ledger.told(request.request_id)
            except lg.LedgerError as exc:  # (then it is news at the next login: no harm)
                log.info("request %s not marked as told: %s", request.request_id, exc)

        self.spawn(told)

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a short background job (an event delivery) under the server's nursery."""
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    # -- connections --

    async def _on_accept(self, stream: trio.abc.Stream) -> None:
        await self.handle_connection(stream, peer_ip(stream))

    async def _on_course_accept(self, stream: trio.abc.Stream) -> None:
        await self.handle_course_connection(stream, peer_ip(stream), peer_port(stream))

    async def handle_connection(self, transport: trio.abc.Stream, ip: str) -> None:
        """Own one native connection from TLS handshake to close."""
        if not self.admission.admit(ip):
            await trio.aclose_forcefully(transport)
            return
        try:
            stream = await self.admission.handshake(transport, ip)
            if stream is not None:
                await self._own(Session(self, stream, ip))
        finally:
            self.admission.release(ip)

    async def handle_course_connection(
        self, transport: trio.abc.Stream, ip: str, port: int = 0
    ) -> None:
        """Own one course-dialect connection (TLS first if the server was told --course-tls);
        ``port`` is its source port (0: unknown)."""
        if not self.admission.admit(ip):
            await trio.aclose_forcefully(transport)
            return
        try:
            stream: trio.abc.Stream | None = transport
            if self.course_tls:
                stream = await self.admission.handshake(transport, ip)
            if stream is not None:
                await self._own(CourseSession(self, stream, ip, port))
        finally:
            self.admission.release(ip)

    async def _own(self, session: SessionBase) -> None:
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
            self.sessions.discard(session)  # (run() has taken it off the presence list)
            if self._closing and not self.sessions:
                self._drained.set()
            log.info("%s: disconnected%s", session.ip, f" ({session.user})" if session.user else "")
