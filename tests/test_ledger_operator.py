"""The ledger's operator side: schema migration, the issuance account, freezing, revoked keys,
and the admin backend (credit, debit, audit, backup) beside a ledger in use."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import trio

from p2ppay import ledger as lg
from p2ppay.ledger import SCHEMA_VERSION, connect_sqlite, open_sqlite_ledger
from p2ppay.ledger.admin import SqliteAdmin
from p2ppay.wire.names import name_key


def make_v1_ledger(path: Path) -> None:
    """A ledger as p2ppay 0.1 (schema version 1) left it: alice deposited 100 and paid bob 30."""
    db = sqlite3.connect(path)
    db.executescript(lg.SCHEMA_V1)
    db.executescript(
        """
        INSERT INTO accounts(name, kind, password_hash, balance, created_ms)
            VALUES ('alice', 'native', 'h', 70, 1), ('bob', 'native', 'h', 30, 2),
                   ('carol', 'course', NULL, 5, 3);
        INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms)
            VALUES ('deposit', 'alice', 100, 100, 10), ('deposit', 'carol', 5, 5, 11);
        INSERT INTO movements(kind, payment_id, payer, payee, amount, payer_balance_after,
                              payee_balance_after, at_ms)
            VALUES ('transfer', '00000000-0000-0000-0000-000000000001', 'alice', 'bob', 30,
                    70, 30, 12);
        PRAGMA user_version = 1;
        """
    )
    db.close()


async def test_a_version_1_ledger_is_migrated_with_everything_in_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_v1_ledger(path)
    pid = uuid.UUID(int=1)
    async with open_sqlite_ledger(path) as ledger:
        audit = await ledger.audit()
        assert audit.conserved
        assert (audit.total_balances, audit.total_deposits, audit.withdrawn) == (105, 105, 0)
        assert (audit.issuance_balance, audit.transfers, audit.accounts) == (-105, 1, 3)
        replay = await ledger.settle(pid, "alice", "bob", 30)  # exactly once, across versions
        assert replay.replayed and replay.payer_balance == 70
        assert [(e.kind, e.amount) for e in await ledger.history("alice", 10)] == [
            ("sent", 30),
            ("deposit", 100),
        ]
        await ledger.deposit("alice", 5)
        assert (await ledger.audit()).conserved
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert (
            db.execute("SELECT frozen, last_login_ms FROM accounts").fetchall() == [(0, None)] * 3
        )
    finally:
        db.close()
    # Opening again (server and admin do, each) migrates nothing twice.
    connect_sqlite(path).close()
    admin = SqliteAdmin(path)
    try:
        assert admin.audit().ok
    finally:
        admin.close()


def test_a_ledger_from_a_newer_p2ppay_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(lg.LedgerUnavailable, match=f"schema version {SCHEMA_VERSION + 1}"):
        connect_sqlite(path)


async def test_deposits_are_double_entry_from_the_issuance_account(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        await ledger.create_account("alice", "h")
        await ledger.create_account("carol", None, "course", initial_deposit=40)
        await ledger.deposit("alice", 100)
        audit = await ledger.audit()
        assert (audit.total_deposits, audit.issuance_balance, audit.total_balances) == (
            140,
            -140,
            140,
        )
        assert audit.conserved
        behind = sqlite3.connect(path)  # the issuance account alone disagrees
        behind.execute("UPDATE issuance SET balance = balance - 1")
        behind.commit()
        behind.close()
        assert not (await ledger.audit()).conserved


async def test_a_frozen_account_can_neither_pay_nor_be_paid(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        for name in ("alice", "bob"):
            await ledger.create_account(name, "h")
            await ledger.deposit(name, 100)
        before = uuid.uuid4()
        await ledger.settle(before, "alice", "bob", 10)
        admin = SqliteAdmin(path)  # another connection, as the admin process has
        try:
            for frozen in ("alice", "bob"):
                admin.set_frozen(frozen, True)
                for payer, payee in (("alice", "bob"), ("bob", "alice")):
                    with pytest.raises(lg.AccountFrozen, match=frozen):
                        await ledger.settle(uuid.uuid4(), payer, payee, 1)
                with pytest.raises(lg.AccountFrozen):
                    await ledger.deposit(frozen, 1)
                # A payment settled before the freeze still answers with its outcome.
                assert (await ledger.settle(before, "alice", "bob", 10)).replayed
                admin.set_frozen(frozen.upper(), False)  # names in any letter case
            assert (await ledger.settle(uuid.uuid4(), "alice", "bob", 1)).payer_balance == 89
            # The operator may still move money in and out of a frozen account.
            admin.set_frozen("bob", True)
            assert admin.adjust("debit", "bob", 11, "claw-back").balance == 100
            assert admin.audit().ok
        finally:
            admin.close()
        audit = await ledger.audit()
        assert audit.conserved and audit.withdrawn == 11


async def test_a_revoked_payee_key_stops_counting_at_once(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        for name in ("alice", "bob"):
            await ledger.create_account(name, "h")
        await ledger.deposit("alice", 100)
        await ledger.set_peer_key("bob", b"key", 2**62)
        await ledger.settle(uuid.uuid4(), "alice", "bob", 1, accepted_with=b"key")
        admin = SqliteAdmin(path)
        try:
            admin.reset_password("bob", "new hash")
        finally:
            admin.close()
        # The server's cached key would still say yes: the ledger reads the key's state.
        with pytest.raises(lg.Unauthorized, match="no current peer key"):
            await ledger.settle(uuid.uuid4(), "alice", "bob", 1, accepted_with=b"key")
        bob = await ledger.account("bob")
        assert bob is not None and bob.password_hash == "new hash" and bob.peer_key is None


def add_account(path: Path, name: str, kind: str) -> None:
    """An account written straight into the file (as another process would)."""
    db = connect_sqlite(path)
    try:
        db.execute(
            "INSERT INTO accounts(name, name_key, kind, password_hash, created_ms)"
            " VALUES (?, ?, ?, 'h', 1)",
            (name, name_key(name), kind),
        )
    finally:
        db.close()


def test_credits_and_debits_happen_once_per_reference(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    connect_sqlite(path).close()
    admin = SqliteAdmin(path)
    try:
        with pytest.raises(lg.UnknownAccount):
            admin.adjust("credit", "alice", 5, "r0")
        add_account(path, "alice", "native")
        first = admin.adjust("credit", "alice", 500, "r1")
        again = admin.adjust("credit", "Alice", 500, "r1")
        assert (first.balance, first.replayed) == (500, False)
        assert (again.balance, again.replayed, again.at_ms) == (500, True, first.at_ms)
        with pytest.raises(lg.ReferenceConflict):
            admin.adjust("credit", "alice", 501, "r1")
        with pytest.raises(lg.ReferenceConflict):
            admin.adjust("debit", "alice", 500, "r1")
        with pytest.raises(lg.InsufficientFunds):
            admin.adjust("debit", "alice", 501, "r2")
        assert admin.adjust("debit", "alice", 200, "r2").balance == 300
        assert admin.adjust("debit", "alice", 200, "r2").replayed
        with pytest.raises(lg.AmountOutOfRange):
            admin.adjust("credit", "alice", 0, "r3")
        assert [(m.kind, m.amount, m.reference) for m in admin.movements()] == [
            ("credit", 500, "r1"),
            ("debit", 200, "r2"),
        ]
        report = admin.audit()
        assert report.ok, report
        (accounts,) = admin.accounts()
        assert (accounts.name, accounts.balance, accounts.frozen) == ("alice", 300, False)
    finally:
        admin.close()


def test_the_audit_finds_a_balance_changed_behind_the_ledgers_back(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    connect_sqlite(path).close()
    admin = SqliteAdmin(path)
    try:
        add_account(path, "alice", "native")
        add_account(path, "bob", "native")
        behind = sqlite3.connect(path, isolation_level=None)  # behind the ledger's back
        admin.adjust("credit", "alice", 50, "r1")
        assert admin.audit().ok
        # Money moved from alice to bob without a movement: the sum still holds.
        behind.execute("UPDATE accounts SET balance = 40 WHERE name = 'alice'")
        behind.execute("UPDATE accounts SET balance = 10 WHERE name = 'bob'")
        failed = {c.name: c.detail for c in admin.audit().checks if not c.ok}
        assert list(failed) == ["balances match movements"]
        assert "alice: balance 40, movements say 50" in failed["balances match movements"]
        # Money made from nothing: conservation fails too.
        behind.execute("UPDATE accounts SET balance = 0 WHERE name = 'bob'")
        behind.execute("UPDATE accounts SET balance = 70 WHERE name = 'alice'")
        failed = {c.name: c.detail for c in admin.audit().checks if not c.ok}
        assert set(failed) == {"conservation", "balances match movements"}
        behind.close()
    finally:
        admin.close()


async def test_backup_of_a_ledger_in_use_is_consistent(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        for name in ("alice", "bob"):
            await ledger.create_account(name, "h")
            await ledger.deposit(name, 1000)
        admin = SqliteAdmin(path)
        try:
            copies: list[Path] = []

            async def pay(n: int) -> None:
                for i in range(n):
                    payer, payee = ("alice", "bob") if i % 2 else ("bob", "alice")
                    await ledger.settle(uuid.uuid4(), payer, payee, 1 + i % 3)

            async def back_up() -> None:
                for i in range(5):
                    dest = tmp_path / f"copy{i}.sqlite3"
                    await trio.to_thread.run_sync(admin.backup, dest)
                    copies.append(dest)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pay, 200)
                    nursery.start_soon(back_up)
            with pytest.raises(lg.LedgerError, match="exists"):
                admin.backup(copies[0])
        finally:
            admin.close()
    for copy in copies:
        assert copy.stat().st_mode & 0o777 == 0o600  # it holds the password hashes
        restored = SqliteAdmin(copy)
        try:
            assert restored.audit().ok
        finally:
            restored.close()
