"""The disk under the ledger: full (issue 22.11), and the ledger file destroyed behind the
server's back (issue 22.12)."""

from __future__ import annotations

import logging
import os
import sqlite3
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.cli.main import build_parser, server_options
from p2ppay.client.peer import PeerKey
from p2ppay.logs import LimitLog
from p2ppay.pki import Issuer
from p2ppay.server import LEDGER_FILE, Server, ServerConfig, run_server

from .conftest import FAST_SCRYPT, PASSWORD, expect_error
from .test_cli_errors import last_line, server
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


# --- the ledger file destroyed behind the server's back (issue 22.12) ---------------------------


def _delete(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    other = path.with_name("other.sqlite3")
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.close()
    os.replace(other, path)


def _truncate(path: Path) -> None:
    # The accounts' pages are in the WAL: checkpoint them, so that the file has them.
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    db.close()
    assert path.stat().st_size > 0
    os.truncate(path, 0)  # as `: > ledger.sqlite3` does


DAMAGE = {"deleted": _delete, "replaced by another file": _replace, "truncated": _truncate}


@pytest.mark.parametrize("what", list(DAMAGE))
async def test_a_ledger_file_destroyed_under_a_running_server_stops_acknowledging(
    what: str,
    tmp_path: Path,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "ledger.sqlite3"
    with trio.fail_after(20):
        # (no look at the file but the commits' own: the next request is what notices)
        async with lg.open_sqlite_ledger(path, check_interval=3600) as ledger:
            server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
            async with running(server), client_of(server, client_ctx) as alice:
                await alice.register("alice", PASSWORD)
                await alice.login("alice", PASSWORD)
                assert await alice.deposit(50) == 50
                DAMAGE[what](path)
                error = await expect_error(p.ErrorCode.INTERNAL, alice.deposit(5))
                assert error.message == "the ledger is unavailable"
                assert ledger.lost.is_set()
                # From then on nothing is answered from it, not even a read.
                await expect_error(p.ErrorCode.INTERNAL, alice.list())
                await expect_error(p.ErrorCode.INTERNAL, alice.deposit(5))
                await expect_error(p.ErrorCode.INTERNAL, alice.history())
    said = [r.getMessage() for r in caplog.records if r.name == "p2ppay.ledger"]
    assert len(said) == 1, said
    assert said[0].startswith(f"the ledger file {path} was {what}")
    assert "nothing more is acknowledged" in said[0]


async def test_an_idle_ledger_notices_its_file_deleted_within_the_check_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite3"
    with trio.fail_after(10):
        async with lg.open_sqlite_ledger(path, check_interval=0.05) as ledger:
            await ledger.create_account("alice", None, "course", 10)
            path.unlink()
            await ledger.lost.wait()  # with no request to notice it
            with pytest.raises(lg.LedgerFileUnusable, match="was deleted"):
                await ledger.balance("alice")
    assert [r.name for r in caplog.records if r.levelno == logging.ERROR] == ["p2ppay.ledger"]


def test_a_ledger_missing_beside_a_ca_is_refused_with_exit_4(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    Issuer.ensure(state)  # a server ran here: the peer CA is there
    done = server(state)
    assert done.returncode == ExitCode.LEDGER
    assert int(ExitCode.LEDGER) == 4  # (documented: README, contrib/p2ppay.service)
    assert last_line(done) == (
        f"p2ppay server: the ledger cannot be used: there is no ledger at {state / LEDGER_FILE},"
        f" but {state} holds a CA (peer-ca.pem, peer-ca.key): a server ran here, so its ledger"
        " is missing. Put it back from a backup (README: Backups), or start with --new-ledger"
        " to begin an empty one"
    )
    assert not (state / LEDGER_FILE).exists()  # nothing made


async def test_new_ledger_starts_an_empty_ledger_beside_a_ca(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    Issuer.ensure(state)
    argv = ["server", "--state-dir", str(state), "--port", "0", "--new-ledger"]
    options = server_options(build_parser().parse_args(argv))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_server, options))
            nursery.cancel_scope.cancel()
    async with lg.open_sqlite_ledger(state / LEDGER_FILE) as ledger:
        assert (await ledger.audit()).accounts == 0


def test_a_damaged_ledger_is_refused_with_exit_4(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / LEDGER_FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x PRIMARY KEY)")
    db.executemany("INSERT INTO t VALUES (?)", [(str(i) * 50,) for i in range(2000)])
    db.commit()
    db.close()
    with path.open("r+b") as f:  # scribble over the index's pages, past the header
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 8192)
    damaged = path.read_bytes()
    done = server(state)
    assert done.returncode == ExitCode.LEDGER
    line = last_line(done)
    assert line.startswith(f"p2ppay server: the ledger cannot be used: {path}")
    assert line.endswith("restore the ledger from a backup")
    assert path.read_bytes() == damaged
