"""Nothing waits for PostgreSQL for ever (issue 22.2): keepalives and ``tcp_user_timeout`` on
the ledger's connections, a statement and a lock timeout on its sessions, and a watchdog for a
backend that does not answer at all (SIGSTOP: its own statement timer is frozen with it)."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import trio

from p2ppay import ledger as lg
from p2ppay.cli.main import build_parser, server_options
from p2ppay.ledger import PgTimeouts, PostgresLedger, open_postgres_ledger
from p2ppay.ledger.pgschema import PgConnection
from p2ppay.presence.postgres import PgPresence

from .test_ledger_postgres import funded

#: small, so that each timeout is seen within a second or two
QUICK = PgTimeouts(statement_timeout=1.0, lock_timeout=0.5)
#: how long a test lets a stall last before it ends it (a main without the fix then answers
#: late instead of hanging the suite)
STALL = 8.0


def _show(db: PgConnection, setting: str) -> str:
    row = db.execute(f"SHOW {setting}").fetchone()
    db.rollback()
    assert row is not None
    return str(row[0])


def _sockopts(db: PgConnection) -> dict[str, int]:
    with socket.socket(fileno=os.dup(db.pgconn.socket)) as sock:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


def _reader(ledger: PostgresLedger) -> PgConnection:
    assert ledger._idle_readers, "a read has left its connection in the pool"
    return ledger._idle_readers[-1]


def _writer(ledger: PostgresLedger) -> PgConnection:
    assert ledger._db is not None, "a batch has opened the writer's connection"
    return ledger._db


async def test_the_writer_and_the_readers_have_keepalives_and_timeouts(postgres_url: str) -> None:
    timeouts = PgTimeouts(
        statement_timeout=3,
        lock_timeout=2,
        keepalive_idle=7,
        keepalive_interval=4,
        keepalive_count=2,
        tcp_user_timeout=9,
    )
    async with open_postgres_ledger(postgres_url, timeouts=timeouts) as ledger:
        await funded(ledger, alice=10)
        assert await ledger.balance("alice") == 10
        # named, so that an operator finds this process's writer in pg_stat_activity
        assert _show(_writer(ledger), "application_name") == f"p2ppay ledger writer {os.getpid()}"
        assert _show(_reader(ledger), "application_name") == f"p2ppay ledger reader {os.getpid()}"
        for db in (_writer(ledger), _reader(ledger)):
            assert _show(db, "statement_timeout") == "2700ms"  # under the watchdog's 3 s
            assert _show(db, "lock_timeout") == "2s"
            assert _sockopts(db) == {
                "keepalive": 1,
                "idle": 7,
                "interval": 4,
                "count": 2,
                "user_timeout_ms": 9000,
            }
    # and by default
    async with open_postgres_ledger(postgres_url) as ledger:
        assert await ledger.balance("alice") == 10
        await ledger.record_login("alice")
        for db in (_writer(ledger), _reader(ledger)):
            assert _show(db, "statement_timeout") == "9500ms"
            assert _show(db, "lock_timeout") == "5s"
            assert _sockopts(db)["keepalive"] == 1
            assert _sockopts(db)["user_timeout_ms"] == 30_000


async def test_the_urls_own_parameters_win(postgres_url: str) -> None:
    url = f"{postgres_url}?keepalives_idle=42&options=-c%20work_mem%3D8MB"
    async with open_postgres_ledger(url) as ledger:
        await funded(ledger, alice=1)
        db = _writer(ledger)
        assert _sockopts(db)["idle"] == 42
        assert _show(db, "work_mem") == "8MB" and _show(db, "statement_timeout") == "9500ms"


def test_the_presence_connections_have_keepalives(postgres_url: str) -> None:
    """Who is online lives in PostgreSQL too: its writer's, readers' and listener's
    connections (all made by ``_connect``) are found dead like the ledger's, not waited on."""
    timeouts = PgTimeouts(keepalive_idle=7, keepalive_interval=4, keepalive_count=2)
    with PgPresence(postgres_url, timeouts=timeouts)._connect() as db:
        assert _sockopts(db) == {
            "keepalive": 1,
            "idle": 7,
            "interval": 4,
            "count": 2,
            "user_timeout_ms": 30_000,
        }
        assert _show(db, "statement_timeout") == "0"  # (the listener waits by design)


@contextmanager
def locked_accounts(url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Every account row locked by another connection (until it commits or rolls back)."""
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM accounts FOR UPDATE")
        yield holder


async def _release_after(conn: psycopg.Connection[tuple[object, ...]], delay: float) -> None:
    await trio.sleep(delay)
    await trio.to_thread.run_sync(conn.rollback)


async def test_a_lock_held_on_accounts_is_internal_error_within_the_lock_timeout(
    postgres_url: str,
) -> None:
    async with open_postgres_ledger(postgres_url, timeouts=QUICK) as ledger:
        await funded(ledger, alice=100, bob=0)
        pid = uuid.uuid4()
        with locked_accounts(postgres_url) as holder:
            async with trio.open_nursery() as nursery:
                # (Without a lock timeout the settle would wait this long, then succeed.)
                nursery.start_soon(_release_after, holder, STALL)
                started = time.monotonic()
                with pytest.raises(lg.LedgerUnavailable, match="lock timeout") as info:
                    await ledger.settle(pid, "alice", "bob", 10)
                assert "\n" not in str(info.value)  # (it is logged: one line)
                waited = time.monotonic() - started
                nursery.cancel_scope.cancel()
        assert waited < QUICK.lock_timeout + 1.0, waited
        # The lock gone, the same payment (the client's retry) settles, once.
        assert (await ledger.settle(pid, "alice", "bob", 10)).payer_balance == 90
        assert (await ledger.audit()).transfers == 1


@contextmanager
def stopped(backend_pid: int) -> Iterator[None]:
    """PostgreSQL's backend process ``backend_pid`` frozen (SIGSTOP), and always thawed;
    skipped when that is not a PostgreSQL process of this machine that we may signal (a
    PostgreSQL elsewhere: the pid would be some other process here)."""
    try:
        with open(f"/proc/{backend_pid}/cmdline", "rb") as cmdline:
            ours = b"postgres" in cmdline.read()
        if ours:
            os.kill(backend_pid, 0)
    except OSError:
        ours = False
    if not ours:
        pytest.skip(f"PostgreSQL's backend {backend_pid} is not a process here we may signal")
    os.kill(backend_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(backend_pid, signal.SIGCONT)


async def _thaw_after(backend_pid: int, delay: float) -> None:
    await trio.sleep(delay)
    os.kill(backend_pid, signal.SIGCONT)


async def test_a_frozen_writer_backend_costs_settles_one_statement_timeout(
    postgres_url: str,
) -> None:
    async with open_postgres_ledger(postgres_url, timeouts=QUICK) as ledger:
        await funded(ledger, alice=100, bob=0)
        frozen = _writer(ledger).info.backend_pid
        pids = [uuid.uuid4() for _ in range(5)]
        failed: list[str] = []

        async def settle(pid: uuid.UUID) -> None:
            try:
                await ledger.settle(pid, "alice", "bob", 1)
            except lg.LedgerUnavailable as exc:
                failed.append(str(exc))

        with stopped(frozen):
            async with trio.open_nursery() as nursery:
                # (Without the watchdog the settles would wait this long, then succeed.)
                nursery.start_soon(_thaw_after, frozen, STALL)
                started = time.monotonic()
                async with trio.open_nursery() as settles:
                    for pid in pids:
                        settles.start_soon(settle, pid)
                waited = time.monotonic() - started
                assert failed and waited < QUICK.watchdog + 1.0, (waited, failed)
                assert all("did not answer within 1 s" in f for f in failed), failed
                # Still frozen: the clients' retries go through on a new connection, and
                # what the frozen backend was sent never commits.
                again = [await ledger.settle(pid, "alice", "bob", 1) for pid in pids]
                assert sum(not t.replayed for t in again) == len(failed)
                assert _writer(ledger).info.backend_pid != frozen
                nursery.cancel_scope.cancel()
        assert (await ledger.audit()).transfers == len(pids)
        assert await ledger.balance("alice") == 100 - len(pids)


async def test_a_frozen_reader_backend_costs_reads_one_statement_timeout(
    postgres_url: str,
) -> None:
    async with open_postgres_ledger(postgres_url, timeouts=QUICK, readers=1) as ledger:
        await funded(ledger, alice=100)
        assert await ledger.balance("alice") == 100
        frozen = _reader(ledger).info.backend_pid
        with stopped(frozen):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_thaw_after, frozen, STALL)
                started = time.monotonic()
                with pytest.raises(lg.LedgerUnavailable, match="did not answer a read"):
                    await ledger.balance("alice")
                assert time.monotonic() - started < QUICK.watchdog + 1.0
                assert await ledger.balance("alice") == 100  # on a new connection
                nursery.cancel_scope.cancel()


def test_the_flags_reach_the_ledger_and_bad_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["server", "--pg-statement-timeout", "2.5", "--pg-lock-timeout", "1",
         "--pg-keepalive-idle", "11", "--pg-keepalive-interval", "6",
         "--pg-keepalive-count", "4", "--pg-tcp-user-timeout", "20"]
    )  # fmt: skip
    assert server_options(args).pg_timeouts == PgTimeouts(2.5, 1, 11, 6, 4, 20)
    assert server_options(parser.parse_args(["server"])).pg_timeouts == PgTimeouts()
    for flag, value in (
        ("--pg-statement-timeout", "0"),
        ("--pg-lock-timeout", "-1"),
        ("--pg-keepalive-idle", "0"),
        ("--pg-keepalive-interval", "x"),
        ("--pg-keepalive-count", "0"),
        ("--pg-tcp-user-timeout", "inf"),
        # (review: beyond what PostgreSQL takes, these were an exit 1 at connect)
        ("--pg-statement-timeout", "1e20"),
        ("--pg-lock-timeout", "2147484"),
        ("--pg-tcp-user-timeout", "0.0001"),
        ("--pg-keepalive-idle", "2147483648"),
        ("--ledger-check-interval", "99999999999999999999"),
    ):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["server", flag, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err
        # one line, not the server's 60-line usage first (review)
        assert err.count("\n") == 1 and err.endswith("(see p2ppay server --help)\n"), err
    with pytest.raises(ValueError, match="--pg-lock-timeout must be more than 0 seconds"):
        PgTimeouts(lock_timeout=0)
