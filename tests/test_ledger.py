"""The ledger: durable, exactly-once, conservative with money."""

from __future__ import annotations

import functools
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ppay import ledger as lg
from p2ppay.ledger import Limits, open_ledger, open_sqlite_ledger
from p2ppay.ledger.admin import SqliteAdmin


async def funded(ledger: lg.AnyLedger, **balances: int) -> None:
    for name, amount in balances.items():
        await ledger.create_account(name, "hash")
        if amount:
            await ledger.deposit(name, amount)


async def test_a_settled_payment_replays_where_a_new_one_would_be_refused(
    ledger: lg.AnyLedger,
) -> None:
    # The stored outcome wins over every check a new payment must pass: the funds it spent,
    # the payee key it was accepted with.
    await funded(ledger, alice=30, bob=0)
    await ledger.set_peer_key("bob", b"key-1", 1)
    pid = uuid.uuid4()
    first = await ledger.settle(pid, "alice", "bob", 30, accepted_with=b"key-1")
    assert not first.replayed
    await ledger.set_peer_key("bob", b"key-2", 2)
    for accepted_with in (b"key-1", b"key-2", None):
        again = await ledger.settle(pid, "alice", "bob", 30, accepted_with=accepted_with)
        assert again.replayed
        assert (again.payer_balance, again.payee_balance, again.at_ms) == (0, 30, first.at_ms)
    with pytest.raises(lg.InsufficientFunds):
        await ledger.settle(uuid.uuid4(), "alice", "bob", 30)
    await ledger.deposit("alice", 5)
    with pytest.raises(lg.Unauthorized):
        await ledger.settle(uuid.uuid4(), "alice", "bob", 5, accepted_with=b"key-1")
    with pytest.raises(lg.PaymentIdConflict):
        await ledger.settle(pid, "alice", "bob", 29)
    audit = await ledger.audit()
    assert (audit.total_balances, audit.transfers) == (35, 1)


async def test_accounts_and_deposits(ledger: lg.AnyLedger) -> None:
    account = await ledger.create_account("alice", "h1")
    assert account == lg.Account("alice", "native", "h1", 0)
    with pytest.raises(lg.NameTaken):
        await ledger.create_account("alice", "h2")
    with pytest.raises(lg.NameTaken):  # names are unique regardless of case
        await ledger.create_account("ALICE", "h2")
    assert await ledger.deposit("alice", 500) == 500
    assert await ledger.deposit("alice", 1) == 501
    found = await ledger.account("alice")
    assert found is not None and found.balance == 501
    assert await ledger.account("nobody") is None
    with pytest.raises(lg.UnknownAccount):
        await ledger.deposit("nobody", 5)


@pytest.mark.parametrize("amount", [0, -1, 1_000_001])
async def test_deposit_limits(ledger: lg.AnyLedger, amount: int) -> None:
    await funded(ledger, alice=0)
    with pytest.raises(lg.AmountOutOfRange):
        await ledger.deposit("alice", amount)


async def test_max_balance(ledger_target: str | Path) -> None:
    async with open_ledger(ledger_target, Limits(max_deposit=100, max_balance=150)) as ledger:
        await funded(ledger, alice=100, bob=100)
        with pytest.raises(lg.BalanceLimit):
            await ledger.deposit("alice", 51)
        with pytest.raises(lg.BalanceLimit):  # the payee's limit holds for payments too
            await ledger.settle(uuid.uuid4(), "alice", "bob", 51)
        assert (await ledger.audit()).total_balances == 200


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_deposit"):
        Limits(max_deposit=0)


async def test_settle_moves_money_exactly_once(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=100, bob=0)
    pid = uuid.uuid4()
    first = await ledger.settle(pid, "alice", "bob", 30)
    assert (first.payer_balance, first.payee_balance, first.replayed) == (70, 30, False)
    again = await ledger.settle(pid, "alice", "bob", 30)
    assert again.replayed
    assert (again.payer_balance, again.payee_balance, again.at_ms) == (70, 30, first.at_ms)
    for other in [("alice", "bob", 31), ("bob", "alice", 30), ("alice", "carol", 30)]:
        with pytest.raises(lg.PaymentIdConflict):
            await ledger.settle(pid, *other)
    alice, bob = await ledger.account("alice"), await ledger.account("bob")
    assert alice is not None and bob is not None
    assert (alice.balance, bob.balance) == (70, 30)
    assert (await ledger.audit()).transfers == 1


async def test_settle_refusals_change_nothing(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=100, bob=0)
    cases: list[tuple[str, str, int, type[lg.LedgerError]]] = [
        ("alice", "bob", 101, lg.InsufficientFunds),
        ("alice", "alice", 1, lg.SelfPayment),
        ("alice", "nobody", 1, lg.UnknownPayee),
        ("nobody", "bob", 1, lg.UnknownAccount),
        ("alice", "bob", 0, lg.AmountOutOfRange),
        ("alice", "bob", 1_000_001, lg.AmountOutOfRange),
    ]
    for payer, payee, amount, error in cases:
        with pytest.raises(error):
            await ledger.settle(uuid.uuid4(), payer, payee, amount)
    audit = await ledger.audit()
    assert (audit.total_balances, audit.total_deposits, audit.transfers) == (100, 100, 0)


async def test_a_failed_settle_can_be_retried_with_the_same_id(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=10, bob=0)
    pid = uuid.uuid4()
    with pytest.raises(lg.InsufficientFunds):
        await ledger.settle(pid, "alice", "bob", 20)
    await ledger.deposit("alice", 10)
    assert (await ledger.settle(pid, "alice", "bob", 20)).payer_balance == 0


async def test_fifty_concurrent_settlements_with_money_for_twenty(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=200, bob=0)
    outcomes: list[str] = []

    async def pay() -> None:
        try:
            await ledger.settle(uuid.uuid4(), "alice", "bob", 10)
            outcomes.append("ok")
        except lg.InsufficientFunds:
            outcomes.append("poor")

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(pay)
    assert outcomes.count("ok") == 20 and outcomes.count("poor") == 30
    alice = await ledger.account("alice")
    assert alice is not None and alice.balance == 0
    assert (await ledger.audit()).conserved


async def test_concurrent_operations_share_commits(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=1000, bob=0)
    commits_before, ops_before = ledger.commits, ledger.ops_committed
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(ledger.settle, uuid.uuid4(), "alice", "bob", 1)
    commits = ledger.commits - commits_before
    assert ledger.ops_committed - ops_before == 100
    assert commits < 100 / 5, f"100 concurrent settlements took {commits} commits"


async def test_history_newest_first(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=100, bob=5)
    pid = uuid.uuid4()
    await ledger.settle(pid, "alice", "bob", 40)
    entries = await ledger.history("bob", 10)
    assert [(e.kind, e.amount, e.balance, e.counterparty) for e in entries] == [
        ("received", 40, 45, "alice"),
        ("deposit", 5, 5, None),
    ]
    assert entries[0].payment_id == pid
    alice = await ledger.history("alice", 1)
    assert [(e.kind, e.balance, e.counterparty) for e in alice] == [("sent", 60, "bob")]


async def test_everything_survives_reopening(ledger_target: str | Path) -> None:
    pid = uuid.uuid4()
    async with open_ledger(ledger_target) as ledger:
        await funded(ledger, alice=100, bob=0)
        await ledger.settle(pid, "alice", "bob", 25)
    async with open_ledger(ledger_target) as ledger:
        again = await ledger.settle(pid, "alice", "bob", 25)
        assert again.replayed and again.payer_balance == 75
        audit = await ledger.audit()
        assert (audit.total_balances, audit.total_deposits, audit.transfers) == (100, 100, 1)
    if lg.is_postgres_url(ledger_target):
        return
    db = sqlite3.connect(ledger_target)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_the_schema_itself_refuses_negative_balances(tmp_path: Path) -> None:
    # Defence in depth: even a buggy operation cannot write a negative balance.
    path = tmp_path / "ledger.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        await funded(ledger, alice=5)
        db = lg.connect_sqlite(path)
        try:
            with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
                db.execute("UPDATE accounts SET balance = -1 WHERE name = 'alice'")
        finally:
            db.close()
        alice = await ledger.account("alice")
        assert alice is not None and alice.balance == 5


class FailingCommit(sqlite3.Connection):
    """A ledger connection whose COMMIT fails, once told to, as on a full disk."""

    failing = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


C = TypeVar("C", bound=sqlite3.Connection)


def writer_of(factory: type[C]) -> tuple[list[C], Callable[[str], sqlite3.Connection]]:
    """A ledger's ``connect=`` that makes its writer connection a ``factory``, and the list
    it will be in (so that the test can tell it what to do)."""
    writers: list[C] = []

    def connect(path: str) -> sqlite3.Connection:
        db = lg.connect_sqlite(path, factory=factory)
        assert isinstance(db, factory)
        writers.append(db)
        return db

    return writers, connect


async def test_a_failed_commit_acknowledges_nothing(tmp_path: Path) -> None:
    writers, connect = writer_of(FailingCommit)
    async with open_sqlite_ledger(tmp_path / "ledger.sqlite3", connect=connect) as ledger:
        await funded(ledger, alice=100, bob=0)
        (writer,) = writers
        writer.failing = True
        with pytest.raises(lg.LedgerUnavailable, match="commit failed"):
            await ledger.settle(uuid.uuid4(), "alice", "bob", 10)
        writer.failing = False
        audit = await ledger.audit()
        assert (audit.total_balances, audit.transfers) == (100, 0)
        alice = await ledger.account("alice")
        assert alice is not None and alice.balance == 100
        assert await ledger.balance("alice") == 100  # the cache has nothing uncommitted
        # The writer goes on: the next batch commits.
        assert (await ledger.settle(uuid.uuid4(), "alice", "bob", 10)).payer_balance == 90


async def test_closed_ledger_refuses_work(ledger_target: str | Path) -> None:
    async with open_ledger(ledger_target) as ledger:
        pass
    with pytest.raises(lg.LedgerUnavailable):
        await ledger.deposit("alice", 1)
    with pytest.raises(lg.LedgerUnavailable):
        await ledger.settle(uuid.uuid4(), "alice", "bob", 1)


async def test_balance_is_the_accounts_balance(ledger: lg.AnyLedger) -> None:
    await funded(ledger, Alice=100, bob=0)
    assert await ledger.balance("ALICE") == 100
    await ledger.settle(uuid.uuid4(), "alice", "bob", 30)
    assert (await ledger.balance("alice"), await ledger.balance("Bob")) == (70, 30)
    assert await ledger.deposit("bob", 5) == 35
    assert await ledger.balance("bob") == 35
    assert await ledger.balance("nobody") is None


async def test_cached_balances_follow_our_writes_at_once_and_others_within_the_ttl(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with open_sqlite_ledger(path, balance_ttl=0.2) as ledger:
        await funded(ledger, alice=100, bob=0)
        await ledger.settle(uuid.uuid4(), "alice", "bob", 10)
        hits = ledger.balance_cache_hits
        assert (await ledger.balance("Alice"), await ledger.balance("bob")) == (90, 10)
        assert ledger.balance_cache_hits == hits + 2  # our own commit: cached before answered
        # Another process (the operator's) writes the file: nothing tells this one, so the
        # cache is checked by each batch, and by an empty one at least every ttl / 2.
        admin = SqliteAdmin(path)
        try:
            assert admin.adjust("credit", "alice", 50, "wire-1").balance == 140
        finally:
            admin.close()
        with trio.fail_after(10):
            while (seen := await ledger.balance("alice")) != 140:
                assert seen == 90  # the old balance, or the new one: nothing in between
                await trio.sleep(0.01)
        # ...and the cache serves the new balance (read back into it by the next batch).
        with trio.fail_after(10):
            while True:
                hits = ledger.balance_cache_hits
                assert await ledger.balance("alice") == 140
                if ledger.balance_cache_hits > hits:
                    break
                await trio.sleep(0.01)
        await ledger.settle(uuid.uuid4(), "bob", "alice", 10)
        assert await ledger.balance("alice") == 150
        audit = await ledger.audit()
        assert audit.conserved


# --- property: conservation under random operations -----------------------------------------

NAMES = ["a", "b", "c", "d"]
PIDS = [uuid.UUID(int=i) for i in range(1, 6)]  # few ids, so that retries and conflicts happen

operation = st.one_of(
    st.tuples(st.just("deposit"), st.sampled_from(NAMES), st.integers(-5, 300)),
    st.tuples(
        st.just("settle"),
        st.sampled_from(PIDS),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.integers(-5, 300),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, max_size=40), concurrent=st.booleans())
async def test_random_operations_conserve_money(
    ops: list[tuple[object, ...]], concurrent: bool
) -> None:
    async with open_sqlite_ledger(":memory:", Limits(max_deposit=200, max_payment=250)) as ledger:
        for name in NAMES:  # two native accounts and two course ones, which never mix
            await ledger.create_account(name, None, "native" if name in "ab" else "course")
        deposited = 0
        outcomes: dict[uuid.UUID, tuple[str, str, int]] = {}

        async def run(op: tuple[object, ...]) -> None:
            nonlocal deposited
            try:
                if op[0] == "deposit":
                    _, name, amount = op
                    assert isinstance(name, str) and isinstance(amount, int)
                    await ledger.deposit(name, amount)
                    deposited += amount
                else:
                    _, pid, payer, payee, amount = op
                    assert isinstance(pid, uuid.UUID) and isinstance(amount, int)
                    assert isinstance(payer, str) and isinstance(payee, str)
                    t = await ledger.settle(pid, payer, payee, amount)
                    first = outcomes.setdefault(pid, (t.payer, t.payee, t.amount))
                    assert first == (payer, payee, amount)  # an id never means two payments
            except lg.LedgerUnavailable:
                raise
            except lg.LedgerError:
                pass  # a refusal: it must have changed nothing, which the audit checks

        if concurrent:
            async with trio.open_nursery() as nursery:
                for op in ops:
                    nursery.start_soon(run, op)
        else:
            for op in ops:
                await run(op)
        audit = await ledger.audit()
        assert audit.total_balances == audit.total_deposits == deposited
        assert audit.min_balance is not None and audit.min_balance >= 0
        assert audit.transfers == len(outcomes)
        for name in NAMES:  # the balance cache agrees with the table
            account = await ledger.account(name)
            assert account is not None and await ledger.balance(name) == account.balance


async def test_history_merges_both_sides_newest_first(ledger: lg.AnyLedger) -> None:
    await funded(ledger, alice=500, bob=500)
    expected: list[tuple[str, int]] = []
    for i in range(1, 21):  # alternate directions, with deposits in between
        if i % 3 == 0:
            await ledger.deposit("alice", i)
            expected.append(("deposit", i))
        elif i % 2:
            await ledger.settle(uuid.uuid4(), "alice", "bob", i)
            expected.append(("sent", i))
        else:
            await ledger.settle(uuid.uuid4(), "bob", "alice", i)
            expected.append(("received", i))
    expected.reverse()
    for limit in (1, 5, 14, 50):
        entries = await ledger.history("alice", limit)
        assert [(e.kind, e.amount) for e in entries] == [*expected, ("deposit", 500)][:limit]


# --- names: looked up by their canonical form (schema version 2) ------------------------------


async def test_accounts_are_found_in_any_letter_case(ledger: lg.AnyLedger) -> None:
    await funded(ledger, Alice=100, bob=0)
    with pytest.raises(lg.NameTaken):
        await ledger.create_account("ALICE", "h")
    account = await ledger.account("aLICE")
    assert account is not None and account.name == "Alice"
    assert await ledger.deposit("alice", 5) == 105
    pid = uuid.uuid4()
    t = await ledger.settle(pid, "ALICE", "Bob", 10)
    assert (t.payer, t.payee, t.replayed) == ("Alice", "bob", False)
    again = await ledger.settle(pid, "alice", "BOB", 10)
    assert (again.payer, again.payee, again.replayed) == ("Alice", "bob", True)
    with pytest.raises(lg.PaymentIdConflict):
        await ledger.settle(pid, "alice", "bob", 11)
    with pytest.raises(lg.SelfPayment):
        await ledger.settle(uuid.uuid4(), "Alice", "aLiCe", 1)
    entries = await ledger.history("ALICE", 10)
    assert [(e.kind, e.counterparty) for e in entries] == [
        ("sent", "bob"),
        ("deposit", None),
        ("deposit", None),
    ]
    await ledger.set_peer_key("alice", b"key", 1)
    assert (await ledger.account("Alice")).peer_key == b"key"  # type: ignore[union-attr]
    await ledger.set_peer_key("ALICE", None, None)
    assert (await ledger.account("Alice")).peer_key is None  # type: ignore[union-attr]


async def test_a_version_1_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    pid = uuid.uuid4()
    db = sqlite3.connect(path)
    db.executescript(lg.SCHEMA_V1)
    db.executescript(
        f"""
        INSERT INTO accounts(name, kind, password_hash, balance, created_ms)
            VALUES ('Alice', 'native', 'h', 60, 1), ('bob', 'native', 'h', 40, 1);
        INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms)
            VALUES ('deposit', 'Alice', 100, 100, 2);
        INSERT INTO movements(kind, payment_id, payer, payee, amount, payer_balance_after,
                              payee_balance_after, at_ms)
            VALUES ('transfer', '{pid}', 'Alice', 'bob', 40, 60, 40, 3);
        PRAGMA user_version = 1;
        """
    )
    db.close()
    async with open_sqlite_ledger(path) as ledger:
        alice = await ledger.account("ALICE")
        assert alice is not None and (alice.name, alice.balance) == ("Alice", 60)
        again = await ledger.settle(pid, "alice", "BOB", 40)
        assert again.replayed and (again.payer, again.payee, again.payer_balance) == (
            "Alice",
            "bob",
            60,
        )
        with pytest.raises(lg.NameTaken):
            await ledger.create_account("BOB", "h")
        await ledger.create_account("Carol", "h")
        assert [e.kind for e in await ledger.history("alice", 10)] == ["sent", "deposit"]
        audit = await ledger.audit()
        assert audit.conserved and (audit.accounts, audit.transfers) == (3, 1)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == lg.SCHEMA_VERSION == 5
        keys = dict(db.execute("SELECT name, name_key FROM accounts").fetchall())
        assert keys == {"Alice": "alice", "bob": "bob", "Carol": "carol"}
        indexes = {row[1] for row in db.execute("PRAGMA index_list(accounts)")}
        assert "accounts_name_key" in indexes and "accounts_name_nocase" not in indexes
    finally:
        db.close()


async def test_a_fresh_ledger_and_an_upgraded_one_have_the_same_schema(tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(lg.SCHEMA_V1 + "PRAGMA user_version = 1;")
    db.close()
    async with open_sqlite_ledger(old), open_sqlite_ledger(tmp_path / "new.sqlite3"):
        pass

    def schema(path: Path) -> list[tuple[str, str]]:
        db = sqlite3.connect(path)
        try:
            return db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        finally:
            db.close()

    assert schema(old) == schema(tmp_path / "new.sqlite3")


async def test_a_failed_upgrade_leaves_the_ledger_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(lg.SCHEMA_V1)
    # Two names the same but for case: impossible under version 1's NOCASE index, so forced.
    db.executescript(
        """
        DROP INDEX accounts_name_nocase;
        INSERT INTO accounts(name, kind, balance, created_ms)
            VALUES ('dup', 'course', 0, 1), ('DUP', 'course', 0, 1);
        PRAGMA user_version = 1;
        """
    )
    db.close()
    refused = pytest.RaisesExc(lg.LedgerUnavailable, match="cannot upgrade the schema to version 2")
    with pytest.RaisesGroup(refused, allow_unwrapped=True, flatten_subgroups=True):
        async with open_sqlite_ledger(path):
            pass
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = {row[1] for row in db.execute("PRAGMA table_info(accounts)")}
        assert "name_key" not in columns
    finally:
        db.close()


async def test_names_the_rule_now_refuses_are_found(tmp_path: Path) -> None:
    """An older p2ppay let names like "-" in; such accounts cannot log in any more, and the
    server names them at start-up."""
    path = tmp_path / "ledger.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        await ledger.create_account("alice", "h")
        behind = sqlite3.connect(path)  # as the older p2ppay wrote them
        behind.executemany(
            "INSERT INTO accounts(name, name_key, kind, created_ms) VALUES (?, ?, 'course', 1)",
            [("-", "-"), ("..", ".."), ("_x", "_x")],
        )
        behind.commit()
        behind.close()
        assert await ledger.invalid_names() == ["-", "..", "_x"]


class SlowCommit(sqlite3.Connection):
    """A ledger connection whose COMMIT waits, once told to, until released (a slow disk)."""

    hold: threading.Event | None = None
    holding = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.hold is not None:
            type(self).holding.set()
            self.hold.wait(10)
        return super().execute(sql, *args)


async def test_reads_do_not_wait_behind_a_commit(tmp_path: Path) -> None:
    writers, connect = writer_of(SlowCommit)
    async with open_sqlite_ledger(tmp_path / "ledger.sqlite3", connect=connect) as ledger:
        await funded(ledger, alice=100, bob=0)
        (writer,) = writers
        writer.hold = release = threading.Event()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ledger.settle, uuid.uuid4(), "alice", "bob", 10)
                await trio.to_thread.run_sync(SlowCommit.holding.wait, 5)
                # The commit is stuck on the disk; reads are answered all the same, from what
                # was committed before it.
                alice = await ledger.account("alice")
                assert alice is not None and alice.balance == 100
                assert [e.kind for e in await ledger.history("alice", 5)] == ["deposit"]
                assert writer.in_transaction  # (still stuck)
                release.set()
            alice = await ledger.account("alice")
            assert alice is not None and alice.balance == 90
        writer.hold = None


# --- history: cursor paging and filters --------------------------------------------------------


async def _mixed_history(ledger: lg.AnyLedger) -> None:
    """alice: a deposit, then 30 movements with bob, carol and deposits, in turn (every
    third payment with a memo)."""
    await funded(ledger, alice=1000, bob=1000, carol=1000)
    for i in range(1, 31):
        memo = f"#{i}; thanks" if i % 3 == 0 else None
        if i % 5 == 0:
            await ledger.deposit("alice", i)
        elif i % 2:
            await ledger.settle(uuid.uuid4(), "alice", "bob" if i % 3 else "carol", i, memo=memo)
        else:
            await ledger.settle(uuid.uuid4(), "carol" if i % 4 else "bob", "alice", i, memo=memo)


async def test_history_pages_cover_everything_once(ledger: lg.AnyLedger) -> None:
    await _mixed_history(ledger)
    whole = await ledger.history("alice", 1000)
    assert len(whole) == 31
    assert [e.seq for e in whole] == sorted((e.seq for e in whole), reverse=True)
    assert [(e.amount, e.memo) for e in whole if e.memo is not None] == [
        (i, f"#{i}; thanks") for i in range(30, 0, -1) if i % 3 == 0 and i % 5
    ]
    for size in (1, 4, 7, 31):
        pages: list[lg.Entry] = []
        before: int | None = None
        while page := await ledger.history("alice", size, before=before):
            assert len(page) <= size
            pages += page
            before = page[-1].seq
        assert pages == whole


async def test_history_filters(ledger: lg.AnyLedger) -> None:
    await _mixed_history(ledger)
    whole = await ledger.history("alice", 1000)
    with_bob = await ledger.history("alice", 1000, counterparty="BOB")
    assert with_bob == [e for e in whole if e.counterparty == "bob"]
    assert {e.kind for e in with_bob} == {"sent", "received"}
    assert await ledger.history("alice", 1000, counterparty="nobody") == []
    # Time bounds: since inclusive, until exclusive; together with a cursor and a counterparty.
    times = sorted({e.at_ms for e in whole})
    middle = times[len(times) // 2]
    assert await ledger.history("alice", 1000, since_ms=middle) == [
        e for e in whole if e.at_ms >= middle
    ]
    assert await ledger.history("alice", 1000, until_ms=middle) == [
        e for e in whole if e.at_ms < middle
    ]
    cursor = with_bob[2].seq
    assert await ledger.history("alice", 2, counterparty="bob", before=cursor) == with_bob[3:5]


async def test_history_reads_one_account_through_the_indexes(ledger: lg.AnyLedger) -> None:
    """Each side of a page is a backward range scan of its index from the cursor (never a
    scan of the table, nor of all of the account's movements)."""
    await _mixed_history(ledger)
    params = {"name": "alice", "limit": 5, "before": 99, "other": "bob", "since": 0}
    params["until"] = 2**62
    if isinstance(ledger, lg.PostgresLedger):
        from p2ppay.ledger.postgres import _HISTORY as PG_HISTORY

        def pg_plan(db: Any, other: str | None) -> list[str]:
            # A table this small is cheaper to scan whole: ask whether the indexes can serve.
            db.execute("SET LOCAL enable_seqscan = off")
            query = f"EXPLAIN {PG_HISTORY}"
            return [row[0] for row in db.execute(query, {**params, "other": other})]

        for other in (None, "bob"):
            details = await ledger._read(functools.partial(pg_plan, other=other))
            scans = [d for d in details if "Index Scan Backward using movements_pa" in d]
            assert len(scans) == 2, details
            if other is None:
                assert {d.split("using ")[1].split()[0] for d in scans} == {
                    "movements_payer",
                    "movements_payee",
                }
            assert sum("seq < " in d for d in details) == 2, details  # from the cursor
            assert not any("Seq Scan" in d or "Bitmap" in d for d in details), details
        return
    from p2ppay.ledger.sqlite import _HISTORY

    def plan(db: sqlite3.Connection) -> list[str]:
        return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {_HISTORY}", params)]

    details = await ledger._read(plan)
    assert any("USING INDEX movements_payer (payer=? AND seq<?)" in d for d in details), details
    assert any("USING INDEX movements_payee (payee=? AND seq<?)" in d for d in details), details
    assert not any(d.startswith("SCAN movements") for d in details), details
