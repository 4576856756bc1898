"""``p2ppay admin`` on a PostgreSQL ledger: the operator's commands beside running nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import trio

from p2ppay import ledger as lg
from p2ppay.ledger.pgadmin import PgAdmin
from p2ppay.ledger.postgres import open_postgres_ledger


async def test_operator_changes_hold_for_the_nodes_at_once(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        for name in ("alice", "bob"):
            await ledger.create_account(name, "h")
        await ledger.set_peer_key("bob", b"key", 2**62)
        admin = await trio.to_thread.run_sync(PgAdmin, postgres_url)
        try:
            with pytest.raises(lg.UnknownAccount):
                admin.adjust("credit", "nobody", 5, "r0")
            first = admin.adjust("credit", "Alice", 500, "r1")
            again = admin.adjust("credit", "alice", 500, "r1")
            assert (first.name, first.balance, first.replayed) == ("alice", 500, False)
            assert (again.balance, again.replayed, again.at_ms) == (500, True, first.at_ms)
            with pytest.raises(lg.ReferenceConflict):
                admin.adjust("credit", "alice", 501, "r1")
            with pytest.raises(lg.InsufficientFunds):
                admin.adjust("debit", "bob", 1, "r2")
            with pytest.raises(lg.AmountOutOfRange):
                admin.adjust("credit", "alice", 0, "r3")
            # The node sees the credit and pays with it.
            paid = await ledger.settle(uuid.uuid4(), "alice", "bob", 20, accepted_with=b"key")
            assert paid.payer_balance == 480
            # A freeze holds from the node's next batch on.
            assert admin.set_frozen("BOB", True).frozen
            with pytest.raises(lg.AccountFrozen):
                await ledger.settle(uuid.uuid4(), "alice", "bob", 1, accepted_with=b"key")
            admin.set_frozen("bob", False)
            # A password reset revokes the payee's key: its acceptances stop counting.
            admin.reset_password("bob", "new hash")
            with pytest.raises(lg.Unauthorized):
                await ledger.settle(uuid.uuid4(), "alice", "bob", 1, accepted_with=b"key")
            assert admin.adjust("debit", "bob", 5, "r4").balance == 15
            report = admin.audit()
            assert report.ok, report
            kinds = [(m.kind, m.amount) for m in admin.movements()]
            assert kinds == [("credit", 500), ("transfer", 20), ("debit", 5)]
            rows = {row.name: row for row in admin.accounts()}
            assert (rows["alice"].balance, rows["bob"].balance) == (480, 15)
            with pytest.raises(lg.LedgerError, match="pg_dump"):
                admin.backup(Path("/tmp/never-written"))
        finally:
            admin.close()
        audit = await ledger.audit()
        assert audit.conserved and audit.withdrawn == 5


async def test_the_audit_finds_money_changed_behind_the_ledgers_back(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await ledger.create_account("alice", "h")
        await ledger.deposit("alice", 50)
    admin = PgAdmin(postgres_url)
    try:
        assert admin.audit().ok
        with psycopg.connect(postgres_url, autocommit=True) as behind:
            behind.execute("UPDATE accounts SET balance = 70 WHERE name = 'alice'")
        failed = {check.name for check in admin.audit().checks if not check.ok}
        assert failed == {"conservation", "balances match movements"}
    finally:
        admin.close()


def test_an_empty_database_is_not_a_ledger(postgres_url: str) -> None:
    with pytest.raises(lg.LedgerUnavailable, match="there is no p2ppay ledger"):
        PgAdmin(postgres_url)


def admin_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2ppay", "admin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.slow
async def test_admin_command_with_a_postgresql_ledger(postgres_url: str, tmp_path: Path) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await ledger.create_account("alice", "h")
    state = str(tmp_path / "unused-state")
    credit = await trio.to_thread.run_sync(
        lambda: admin_cli("--ledger", postgres_url, "credit", "alice", "42", "--reference", "w1")
    )
    assert credit.returncode == 0, credit.stderr
    listed = await trio.to_thread.run_sync(
        lambda: admin_cli("accounts", "--json", "--ledger", postgres_url, "--state-dir", state)
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["name"], row["balance"]) == ("alice", 42)
    audit = await trio.to_thread.run_sync(lambda: admin_cli("audit", "--ledger", postgres_url))
    assert audit.returncode == 0, audit.stderr
    # A server that is not there: one line, exit 1, and the password never shown.
    down = await trio.to_thread.run_sync(
        lambda: admin_cli("audit", "--ledger", "postgresql://op:s3cret@127.0.0.1:1/p2ppay")
    )
    assert down.returncode == 1
    assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    assert "s3cret" not in down.stderr and "cannot connect" in down.stderr
