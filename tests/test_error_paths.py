"""Error paths of the server and the ledger that nothing else reaches: each test pins the exact
code, message or close that the path produces."""

from __future__ import annotations

import logging
import sqlite3
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
import trio
import trio.testing

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost
from p2ppay.logs import LimitLog
from p2ppay.pki import Issuer
from p2ppay.presence.local import Presence
from p2ppay.server import Server, ServerConfig
from p2ppay.server.accounts import Accounts
from p2ppay.server.metrics import ServerMetrics
from p2ppay.server.sessions.native import Session
from p2ppay.wire.course import REFERENCE, Dialect

from .conftest import (
    FAST_SCRYPT,
    PASSWORD,
    SERVER_NAME,
    closed_by_peer,
    expect_error,
    login,
    next_event,
    pay,
    registered,
)


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_in_memory)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(
    server: Server, client_ctx: ssl.SSLContext, ip: str = "10.0.0.1"
) -> AsyncIterator[Client]:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side, ip)
        stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
        async with Client.over(stream) as client:
            yield client


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level and r.name.startswith("p2ppay")]


# --- a replaced session refuses what only the current session may do ---------------------------


class LaggingHost:
    """The server as a session sees it, but whose background jobs (event deliveries) run only
    when the test says: the window in which a replaced session still reads requests."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config: ServerConfig = server.config
        self.ledger: lg.Ledger = server.ledger
        self.accounts: Accounts = server.accounts
        self.presence: Presence = server.presence
        self.limit_log: LimitLog = server.limit_log
        self.request_limit = server.request_limit
        self.server_public_key = server.server_public_key
        self.course_dialect: Dialect = REFERENCE
        self.metrics: ServerMetrics = server.metrics
        self.receipts = server.receipts
        self.jobs: list[Callable[[], Awaitable[None]]] = []

    @property
    def closing(self) -> bool:
        return self.server.closing

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.jobs.append(fn)


async def test_a_replaced_sessions_request_is_refused(
    server: Server, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    host = LaggingHost(server)
    client_side, server_side = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            tls: trio.SSLStream[trio.abc.Stream]
            tls = trio.SSLStream(server_side, server_ctx, server_side=True)
            nursery.start_soon(Session(host, tls, "10.0.0.1").run)
            stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
            async with Client.over(stream) as old, client_of(server, client_ctx, "10.0.0.2") as new:
                await registered(old, "alice", deposit=50)
                await login(new, "alice")
                # The old session has been told it was replaced; the news is still on its way.
                assert len(host.jobs) == 1
                await expect_error(p.ErrorCode.NOT_LOGGED_IN, old.deposit(5))
                error = await expect_error(p.ErrorCode.NOT_LOGGED_IN, old.list())
                assert error.message == "this session was replaced by a newer login"
                # Now the news arrives, and the old connection is closed.
                await host.jobs.pop()()
                event = await next_event(old)
                assert isinstance(event, p.SessionReplaced)
                assert event.message == "alice logged in from 10.0.0.2"
                with pytest.raises(ConnectionLost):
                    await next_event(old)
                # Nothing was deposited by the replaced session.
                assert (await new.list()).balance == 50


# --- the ledger fails -------------------------------------------------------------------------


class FlakyLedger:
    """A SQLite ledger that, while ``failing`` is set, fails every operation with ``error``."""

    def __init__(self, inner: lg.SqliteLedger) -> None:
        self.inner = inner
        self.limits = inner.limits
        self.failing: Exception | None = None

    def _check(self) -> None:
        if self.failing is not None:
            raise self.failing

    async def create_account(
        self,
        name: str,
        password_hash: str | None,
        kind: lg.AccountKind = "native",
        initial_deposit: int = 0,
    ) -> lg.Account:
        self._check()
        return await self.inner.create_account(name, password_hash, kind, initial_deposit)

    async def record_login(self, name: str) -> None:
        pass

    async def account(self, name: str) -> lg.Account | None:
        self._check()
        return await self.inner.account(name)

    async def balance(self, name: str) -> int | None:
        self._check()
        return await self.inner.balance(name)

    async def set_peer_key(self, name: str, key_der: bytes | None, expires_ms: int | None) -> None:
        self._check()
        await self.inner.set_peer_key(name, key_der, expires_ms)

    async def deposit(self, name: str, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        self._check()
        return await self.inner.deposit(name, amount, deposit_id)

    async def change_password(self, name: str, password_hash: str) -> None:
        self._check()
        await self.inner.change_password(name, password_hash)

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        accepted_with: bytes | None = None,
        memo: str | None = None,
    ) -> lg.Transfer:
        self._check()
        return await self.inner.settle(payment_id, payer, payee, amount, accepted_with, memo)

    async def create_request(
        self,
        request_id: uuid.UUID,
        requester: str,
        payer: str,
        amount: int,
        memo: str | None,
        expires_ms: int,
        max_open: int,
        max_per_payer: int,
    ) -> lg.PaymentRequest:
        self._check()
        return await self.inner.create_request(
            request_id, requester, payer, amount, memo, expires_ms, max_open, max_per_payer
        )

    async def open_requests(self, name: str, limit: int) -> lg.OpenRequests:
        self._check()
        return await self.inner.open_requests(name, limit)

    async def purge_requests(self, closed_before_ms: int, limit: int) -> int:
        self._check()
        return await self.inner.purge_requests(closed_before_ms, limit)

    async def pay_request(
        self, request_id: uuid.UUID, payer: str
    ) -> tuple[lg.Transfer, lg.PaymentRequest]:
        self._check()
        return await self.inner.pay_request(request_id, payer)

    async def close_request(
        self, request_id: uuid.UUID, name: str, state: Literal["declined", "cancelled"]
    ) -> lg.PaymentRequest:
        self._check()
        return await self.inner.close_request(request_id, name, state)

    async def request_news(self, name: str) -> list[lg.PaymentRequest]:
        self._check()
        return await self.inner.request_news(name)

    async def told(self, request_id: uuid.UUID) -> None:
        self._check()
        await self.inner.told(request_id)

    async def transfer(self, payment_id: uuid.UUID) -> lg.Transfer | None:
        self._check()
        return await self.inner.transfer(payment_id)

    async def history(self, name: str, limit: int, **filters: Any) -> list[lg.Entry]:
        self._check()
        return await self.inner.history(name, limit, **filters)

    async def audit(self) -> lg.Audit:
        self._check()
        return await self.inner.audit()


@pytest.fixture
def flaky(ledger: lg.SqliteLedger) -> FlakyLedger:
    return FlakyLedger(ledger)


async def test_a_ledger_failure_is_an_internal_error_logged_once(
    flaky: FlakyLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = Server(flaky, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    with trio.fail_after(10):
        async with running(server), client_of(server, client_ctx) as client:
            await registered(client, "alice", deposit=10)
            flaky.failing = lg.LedgerUnavailable("disk I/O error")
            error = await expect_error(p.ErrorCode.INTERNAL, client.deposit(5))
            assert error.message == "the ledger is unavailable"  # the cause is not told
            errors = records(caplog, logging.ERROR)
            assert [r.getMessage() for r in errors] == [
                "10.0.0.1: ledger failure on deposit: disk I/O error"
            ]
            # The session goes on, and works again once the ledger does.
            flaky.failing = None
            assert await client.deposit(5) == 15
    assert len(records(caplog, logging.ERROR)) == 1


async def test_a_ledger_refusal_is_not_an_internal_error(
    flaky: FlakyLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server(flaky, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    with trio.fail_after(10):
        async with running(server), client_of(server, client_ctx) as client:
            await registered(client, "alice")
            flaky.failing = lg.BalanceLimit("the balance would pass 1000")
            error = await expect_error(p.ErrorCode.BALANCE_LIMIT, client.deposit(5))
            assert error.message == "the balance would pass 1000"
    assert not records(caplog, logging.ERROR)


async def test_one_session_crashing_leaves_the_others_served(
    flaky: FlakyLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = Server(flaky, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    with trio.fail_after(10):
        async with (
            running(server),
            client_of(server, client_ctx, "10.0.0.1") as doomed,
            client_of(server, client_ctx, "10.0.0.2") as other,
        ):
            await registered(doomed, "alice", deposit=10)
            await registered(other, "bob", deposit=20)
            flaky.failing = RuntimeError("a bug")  # not a LedgerError: nobody expects it
            with pytest.raises(ConnectionLost):
                await doomed.history()
            flaky.failing = None
            while len(server.sessions) > 1:  # the server is still putting the session away
                await trio.testing.wait_all_tasks_blocked()
            assert server.presence.names() == ["bob"]
            # The other session, and new ones, are served as before.
            assert (await other.list()).balance == 20
            async with client_of(server, client_ctx, "10.0.0.3") as late:
                await login(late, "alice")
                assert (await late.list()).balance == 10
    errors = records(caplog, logging.ERROR)
    assert [r.getMessage() for r in errors] == ["10.0.0.1: internal error; connection closed"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)


# --- who someone is ---------------------------------------------------------------------------


async def test_a_login_with_a_garbage_csr_is_bad_csr(
    server: Server, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(10):
        async with client_of(server, client_ctx) as client:
            await client.register("alice", PASSWORD)
            error = await expect_error(
                p.ErrorCode.BAD_CSR, client.login("alice", PASSWORD, None, "not a CSR")
            )
            assert error.message.startswith("not a PEM certificate signing request")
            assert client.user is None
            assert server.presence.names() == []
            await expect_error(p.ErrorCode.NOT_LOGGED_IN, client.list())


async def test_an_expired_peer_certificate_no_longer_accepts(
    ledger: lg.SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
) -> None:
    import time

    offset = [0.0]
    config = ServerConfig(scrypt=FAST_SCRYPT, peer_cert_lifetime=3600.0)
    server = Server(ledger, server_ctx, issuer, config, wall_clock=lambda: time.time() + offset[0])
    with trio.fail_after(10):
        async with (
            running(server),
            client_of(server, client_ctx) as alice,
            client_of(server, client_ctx) as bob,
        ):
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            assert (await pay(alice, "bob", 10)).balance == 90
            offset[0] = 3600.0 + 60  # past the end of bob's certificate
            error = await expect_error(p.ErrorCode.BAD_ACCEPTANCE, pay(alice, "bob", 10))
            assert error.message == "bob's certificate has expired"
            assert (await alice.list()).balance == 90
            # A new login's certificate does not reach that far either; back in its lifetime,
            # it accepts.
            async with client_of(server, client_ctx) as bob_again:
                await login(bob_again, "bob")
                await expect_error(p.ErrorCode.BAD_ACCEPTANCE, pay(alice, "bob", 10))
                offset[0] = 0.0
                assert (await pay(alice, "bob", 10)).balance == 80


# --- admission --------------------------------------------------------------------------------


async def test_the_global_connection_cap_refuses(
    ledger: lg.SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServerConfig(scrypt=FAST_SCRYPT, max_connections=2)
    server = Server(ledger, server_ctx, issuer, config)
    with trio.fail_after(10):
        async with running(server), client_of(server, client_ctx, "10.0.0.1") as first:
            async with client_of(server, client_ctx, "10.0.0.2") as second:
                await registered(first, "alice")
                await second.register("bob", PASSWORD)
                assert server.admission.connections == 2
                # A third, from yet another address, is closed at once: no TLS, no session.
                refused, server_side = trio.testing.memory_stream_pair()
                await server.handle_connection(server_side, "10.0.0.3")
                assert await closed_by_peer(refused, within=1)
                assert len(server.sessions) == 2
                assert server.admission.per_ip == {"10.0.0.1": 1, "10.0.0.2": 1}
                limit = [
                    r.getMessage() for r in caplog.records if "max-connections" in r.getMessage()
                ]
                assert limit == ["limit max-connections: 2 open; refused 10.0.0.3"]
                # The course listener counts against the same cap.
                course, course_server = trio.testing.memory_stream_pair()
                await server.handle_course_connection(course_server, "10.0.0.4", 5000)
                assert await closed_by_peer(course, within=1)
                assert (await first.list()).online[0].name == "alice"
            # One left: there is room again.
            async with client_of(server, client_ctx, "10.0.0.3") as third:
                await login(third, "bob")
                assert server.admission.connections == 2
    assert server.admission.connections == 0


async def test_course_admission_refuses_past_the_per_address_cap(
    ledger: lg.SqliteLedger, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    config = ServerConfig(scrypt=FAST_SCRYPT, max_connections_per_ip=1)
    server = Server(ledger, server_ctx, issuer, config)
    with trio.fail_after(10):
        async with running(server), trio.open_nursery() as nursery:
            held, held_server = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_course_connection, held_server, "10.5.5.5", 4000)
            await held.send_all(b"REGISTER#carol\n")
            line = await held.receive_some()
            assert line.startswith(b"100")  # registered: the first connection is served
            refused, refused_server = trio.testing.memory_stream_pair()
            await server.handle_course_connection(refused_server, "10.5.5.5", 4001)
            assert await closed_by_peer(refused, within=1)
            assert server.admission.per_ip == {"10.5.5.5": 1}
            # Another address is let in.
            other, other_server = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_course_connection, other_server, "10.6.6.6", 4002)
            await other.send_all(b"REGISTER#dave\n")
            assert (await other.receive_some()).startswith(b"100")
            nursery.cancel_scope.cancel()


# --- the ledger file --------------------------------------------------------------------------


async def test_a_ledger_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    newer = lg.SCHEMA_VERSION + 1
    db = sqlite3.connect(path)
    db.executescript(f"CREATE TABLE from_the_future (x); PRAGMA user_version = {newer};")
    db.close()
    message = f"has schema version {newer}; this p2ppay knows {lg.SCHEMA_VERSION}"
    refused = pytest.RaisesExc(lg.LedgerUnavailable, match=message)
    with pytest.RaisesGroup(refused, allow_unwrapped=True, flatten_subgroups=True):
        async with lg.open_sqlite_ledger(path):
            pass
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == newer
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert tables == {"from_the_future"}  # nothing was created or upgraded
    finally:
        db.close()
