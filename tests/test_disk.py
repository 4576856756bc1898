"""The disk under the ledger: full (issue 22.11), and the ledger file destroyed behind the
server's back (issue 22.12)."""

from __future__ import annotations

import logging
import sqlite3
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509

from p2ppay import ledger as lg
from p2ppay import protocol as p
from p2ppay.limits import LimitLog
from p2ppay.peer import PeerKey
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig

from .conftest import FAST_SCRYPT, PASSWORD, expect_error
from .test_error_paths import client_of, records, running

# --- a full disk (issue 22.11) ------------------------------------------------------------------


class _Disk:
    """Whether the disk under the ledger is full: then a transaction that wrote anything
    fails at COMMIT as SQLite does on a full disk (reads, and commits that wrote nothing,
    still work)."""

    full = False


def _filling(disk: _Disk) -> type[sqlite3.Connection]:
    class FillingConnection(sqlite3.Connection):
        _changes_at_begin = 0

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.startswith("BEGIN"):
                self._changes_at_begin = self.total_changes
            elif sql == "COMMIT" and disk.full and self.total_changes > self._changes_at_begin:
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

    return FillingConnection


@asynccontextmanager
async def full_disk_server(
    tmp_path: Path, server_ctx: ssl.SSLContext, issuer: Issuer
) -> AsyncIterator[tuple[Server, _Disk]]:
    disk = _Disk()
    factory = _filling(disk)
    async with lg.open_sqlite_ledger(
        tmp_path / "ledger.sqlite3", connect=lambda path: lg.connect_sqlite(path, factory=factory)
    ) as ledger:
        server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
        async with running(server):
            yield server, disk


def _not_after(cert_pem: str | None) -> object:
    assert cert_pem is not None
    return x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc


async def test_a_full_disk_still_lets_a_client_log_in_again_and_see_its_balance(
    tmp_path: Path,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    key = PeerKey()
    with trio.fail_after(20):
        async with full_disk_server(tmp_path, server_ctx, issuer) as (server, disk):
            async with client_of(server, client_ctx) as alice:
                await alice.register("alice", PASSWORD)
                first = await alice.login("alice", PASSWORD, 9001, key.csr("alice"))
                assert await alice.deposit(50) == 50
            disk.full = True
            async with client_of(server, client_ctx) as alice:
                # What must be written cannot be: nothing moves, and it says so.
                error = await expect_error(p.ErrorCode.INTERNAL, alice.register("bob", PASSWORD))
                assert error.message == "the ledger is unavailable"
                # The wallet reconnecting logs in again with the key it has: nothing to
                # write (the certificate ends when the first did), so it gets in.
                again = await alice.login("alice", PASSWORD, 9001, key.csr("alice"))
                assert again.balance == 50
                assert _not_after(again.certificate) == _not_after(first.certificate)
                assert (await alice.list()).balance == 50
                assert server.presence.names() == ["alice"]
                # A flood of failing requests costs the log a line per kind, not one each.
                for _ in range(300):
                    await expect_error(p.ErrorCode.INTERNAL, alice.deposit(5))
            for _ in range(50):
                async with client_of(server, client_ctx) as alice:
                    assert (await alice.login("alice", PASSWORD, 9001, key.csr("a"))).balance == 50
            errors = [r.getMessage() for r in records(caplog, logging.ERROR)]
            assert errors == [
                "10.0.0.1: ledger failure on register: commit failed: database or disk is full",
                "ledger failure on login record (skipped): commit failed: database or disk is full",
                "10.0.0.1: ledger failure on deposit: commit failed: database or disk is full",
            ]
            # A new key must be written: that login fails (a key that would not be checked
            # against stays out), and the old one is still the account's.
            async with client_of(server, client_ctx) as other:
                await expect_error(
                    p.ErrorCode.INTERNAL, other.login("alice", PASSWORD, 9002, PeerKey().csr("a"))
                )
            # Once there is room again, everything is written again.
            disk.full = False
            async with client_of(server, client_ctx) as alice:
                fresh = await alice.login("alice", PASSWORD, 9001, PeerKey().csr("alice"))
                assert fresh.balance == 50
                assert await alice.deposit(5) == 55


async def test_a_full_disk_still_lets_a_course_client_log_in(
    tmp_path: Path, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(20):
        async with full_disk_server(tmp_path, server_ctx, issuer) as (server, disk):
            await server.ledger.create_account("carol", None, "course", 70)
            disk.full = True
            client_side, server_side = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle_course_connection, server_side, "10.0.0.5")
                await client_side.send_all(b"carol#5000\n")
                reply = b""
                while b"carol#" not in reply:
                    reply += await client_side.receive_some()
                assert reply.startswith(b"70\n")
                nursery.cancel_scope.cancel()


def test_the_failure_log_says_a_flood_once_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limit_log = LimitLog(logging.getLogger("p2ppay.test"), clock=lambda: now[0])
    caplog.set_level(logging.INFO)
    for second in range(40):  # 600 failures in 40 s, as on a full disk (15 a second)
        now[0] = float(second)
        for _ in range(15):
            limit_log.failed("ledger settle", "ledger failure on settle: disk full")
    now[0] = 61.0
    limit_log.failed("ledger settle", "ledger failure on settle: disk full")
    limit_log.failed("ledger deposit", "ledger failure on deposit: disk full")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.ERROR, "ledger failure on settle: disk full"),
        (logging.ERROR, "ledger failure on settle: disk full (and 599 more since the last report)"),
        (logging.ERROR, "ledger failure on deposit: disk full"),
    ]
