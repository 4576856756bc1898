"""The PostgreSQL ledger's own behaviour: several nodes on one database, the NOTIFY contract,
its schema, its failures. (What both backends share is in test_ledger.py, run on each.)"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
from psycopg.types.json import Jsonb

from p2ppay import ledger as lg
from p2ppay.ledger import Limits, PostgresLedger, open_ledger, open_postgres_ledger
from p2ppay.ledger.pgschema import node_channel


async def funded(ledger: lg.AnyLedger, **balances: int) -> None:
    for name, amount in balances.items():
        await ledger.create_account(name, "hash")
        if amount:
            await ledger.deposit(name, amount)


@contextmanager
def listening(url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A connection that has run ``LISTEN p2ppay_settled``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {lg.SETTLED_CHANNEL}")
        yield conn


async def notifications(
    conn: psycopg.Connection[tuple[object, ...]], within: float, stop_after: int = 1
) -> list[dict[str, object]]:
    """The payloads ``conn`` receives within ``within`` seconds (up to ``stop_after``)."""

    def wait() -> list[dict[str, object]]:
        found = conn.notifies(timeout=within, stop_after=stop_after)
        return [json.loads(n.payload) for n in found if n.channel == lg.SETTLED_CHANNEL]

    return await trio.to_thread.run_sync(wait)


async def test_open_ledger_picks_the_backend(postgres_url: str, tmp_path: Path) -> None:
    async with open_ledger(postgres_url) as pg, open_ledger(tmp_path / "l.db") as sq:
        assert isinstance(pg, PostgresLedger) and isinstance(sq, lg.SqliteLedger)
    assert lg.is_postgres_url("postgres://x/y") and not lg.is_postgres_url(tmp_path / "x")


async def test_an_unreachable_server_is_one_clear_line() -> None:
    url = "postgresql://p2ppay:s3cretpw@127.0.0.1:1/ledger?connect_timeout=2"
    with pytest.raises(lg.LedgerUnavailable) as info:
        async with open_postgres_ledger(url):
            pass  # pragma: no cover
    message = str(info.value)
    assert "s3cretpw" not in message and "\n" not in message
    assert message.startswith("cannot connect to PostgreSQL at 127.0.0.1:1/ledger")


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=5)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE p2ppay_schema SET version = %s", (lg.PG_SCHEMA_VERSION + 1,))
    newer, known = lg.PG_SCHEMA_VERSION + 1, lg.PG_SCHEMA_VERSION
    with pytest.raises(
        lg.LedgerUnavailable, match=f"has schema version {newer}; this p2ppay knows {known}"
    ):
        async with open_postgres_ledger(postgres_url):
            pass  # pragma: no cover


async def test_nodes_starting_together_create_the_schema_once(postgres_url: str) -> None:
    async def node() -> None:
        async with open_postgres_ledger(postgres_url) as ledger:
            assert (await ledger.audit()).accounts == 0

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(node)
    with psycopg.connect(postgres_url) as db:
        rows = db.execute("SELECT version FROM p2ppay_schema").fetchall()
    assert rows == [(lg.PG_SCHEMA_VERSION,)]


async def test_one_payment_id_at_two_nodes_at_once_is_applied_once(postgres_url: str) -> None:
    async with (
        open_postgres_ledger(postgres_url) as one,
        open_postgres_ledger(postgres_url) as two,
    ):
        await funded(one, alice=1000, bob=0)
        pids = [uuid.uuid4() for _ in range(40)]
        outcomes: dict[uuid.UUID, list[lg.Transfer]] = {pid: [] for pid in pids}

        async def settle(node: PostgresLedger, pid: uuid.UUID) -> None:
            outcomes[pid].append(await node.settle(pid, "alice", "bob", 7))

        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(settle, one, pid)
                nursery.start_soon(settle, two, pid)
        for pid, (a, b) in outcomes.items():
            assert sorted([a.replayed, b.replayed]) == [False, True], pid
            fields = ("payer", "payee", "amount", "payer_balance", "payee_balance", "at_ms")
            assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        audit = await two.audit()
        assert audit.conserved and audit.transfers == len(pids)
        alice = await one.account("alice")
        assert alice is not None and alice.balance == 1000 - 7 * len(pids)


async def test_busy_nodes_never_deadlock_and_conserve_money(postgres_url: str) -> None:
    names = [f"user{i}" for i in range(12)]
    rng = random.Random(11)
    async with (
        open_postgres_ledger(postgres_url, max_batch=64) as a,
        open_postgres_ledger(postgres_url, max_batch=64) as b,
        open_postgres_ledger(postgres_url, max_batch=64) as c,
    ):
        nodes = [a, b, c]
        await funded(a, **dict.fromkeys(names, 500))
        failures: list[BaseException] = []
        applied = 0

        async def client(node: PostgresLedger, seed: float) -> None:
            nonlocal applied
            mine = random.Random(seed)
            for _ in range(60):
                payer, payee = mine.sample(names, 2)
                try:
                    await node.settle(uuid.uuid4(), payer, payee, mine.randint(1, 120))
                    applied += 1
                except lg.InsufficientFunds:
                    pass
                except lg.LedgerError as exc:  # anything else is a failure of the test
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(24):  # 8 concurrent clients per node: batches of several
                nursery.start_soon(client, nodes[i % 3], rng.random())
        assert failures == []
        # Sorted locking: settle-only batches never meet a deadlock, not even retried ones.
        assert sum(node.retries for node in nodes) == 0
        assert sum(node.ops_committed for node in nodes) > sum(node.commits for node in nodes)
        audit = await c.audit()
        assert audit.conserved and audit.total_balances == 500 * len(names)
        assert audit.transfers == applied


async def test_a_new_transfer_is_announced_after_commit(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, Alice=100, bob=0)
        with listening(postgres_url) as listener:
            pid = uuid.uuid4()
            t = await ledger.settle(pid, "alice", "BOB", 30)
            (event,) = await notifications(listener, within=5)
            assert event == {
                "payment_id": str(pid),
                "payer": "Alice",
                "payee": "bob",
                "amount": 30,
                "payer_balance": 70,
                "payee_balance": 30,
                "at_ms": t.at_ms,
            }
            # A replay and a refusal announce nothing: the next event is the next transfer.
            assert (await ledger.settle(pid, "alice", "bob", 30)).replayed
            with pytest.raises(lg.InsufficientFunds):
                await ledger.settle(uuid.uuid4(), "alice", "bob", 1000)
            second = uuid.uuid4()
            await ledger.settle(second, "bob", "alice", 5)
            (event,) = await notifications(listener, within=5)
            assert event["payment_id"] == str(second)
            assert await notifications(listener, within=0.2) == []


async def test_a_transfer_is_announced_on_the_payees_node_alone(postgres_url: str) -> None:
    """Where the payee has a presence row, only that node's channel hears of the transfer;
    with none (offline, or a login not written yet), every node does."""
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=100, bob=0, carol=0)
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute("INSERT INTO nodes VALUES ('node-b', 0)")
            db.execute(
                "INSERT INTO presence VALUES ('bob', false, 'bob', 'node-b', '127.0.0.1', 1, 0, 1)"
            )
        with (
            listening(postgres_url) as everyone,
            psycopg.connect(postgres_url, autocommit=True) as node_b,
        ):
            node_b.execute(f"LISTEN {node_channel('node-b')}")
            to_bob, to_carol = uuid.uuid4(), uuid.uuid4()
            await ledger.settle(to_bob, "alice", "bob", 10)
            await ledger.settle(to_carol, "alice", "carol", 20)

            def heard(conn: psycopg.Connection[tuple[object, ...]]) -> list[tuple[str, object]]:
                found = conn.notifies(timeout=1.0, stop_after=2)
                return [(n.channel, json.loads(n.payload)["payment_id"]) for n in found]

            assert await trio.to_thread.run_sync(heard, node_b) == [
                (node_channel("node-b"), str(to_bob))
            ]
            assert await trio.to_thread.run_sync(heard, everyone) == [
                (lg.SETTLED_CHANNEL, str(to_carol))
            ]


async def test_sql_and_python_name_a_nodes_channel_alike(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url):
        pass
    with psycopg.connect(postgres_url) as db:
        for node_id in ("host-1234-abcd", "hôte-ünï-€-42", "x" * 300, ""):
            row = db.execute("SELECT p2ppay_node_channel(%s)", (node_id,)).fetchone()
            assert row is not None and row[0] == node_channel(node_id)
            assert len(row[0]) == 28 and row[0].isidentifier()


async def test_no_announcement_before_commit_nor_after_rollback(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=100, bob=0)
    limits = Limits()
    with listening(postgres_url) as listener, psycopg.connect(postgres_url) as node:

        def settle_uncommitted(pid: uuid.UUID) -> str:
            batch = [
                {
                    "pid": str(pid),
                    "payer_key": "alice",
                    "payee_key": "bob",
                    "amount": 1,
                    "key": None,
                }
            ]
            row = node.execute(
                "SELECT o_code FROM p2ppay_settle_batch(%s, %s, %s, 1)",
                (Jsonb(batch), limits.max_payment, limits.max_balance),
            ).fetchone()
            assert row is not None
            return str(row[0])

        rolled_back, committed = uuid.uuid4(), uuid.uuid4()
        assert settle_uncommitted(rolled_back) == "ok"
        assert await notifications(listener, within=0.3) == []  # in flight: not yet
        node.rollback()
        assert settle_uncommitted(committed) == "ok"
        assert await notifications(listener, within=0.3) == []
        node.commit()
        (event,) = await notifications(listener, within=5)
        assert event["payment_id"] == str(committed)


async def test_a_deposit_then_a_settle_in_one_batch(postgres_url: str) -> None:
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=0, bob=0, carol=0)
        commits = ledger.commits
        results: dict[str, object] = {}

        async def run(label: str, call: Awaitable[object]) -> None:
            results[label] = await call

        with psycopg.connect(postgres_url) as other:
            # Another node holds carol's row: the writer's first batch waits on it, and what
            # is submitted meanwhile queues up, in order, for the next batch.
            other.execute("SELECT 1 FROM accounts WHERE name = 'carol' FOR UPDATE")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "carol", ledger.deposit("carol", 1))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(run, "deposit", ledger.deposit("alice", 10))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(run, "settle", ledger.settle(uuid.uuid4(), "alice", "bob", 10))
                await trio.testing.wait_all_tasks_blocked()
                other.commit()
        assert ledger.commits == commits + 2 and ledger.ops_committed >= 3
        assert results["deposit"] == 10
        settled = results["settle"]
        assert isinstance(settled, lg.Transfer) and settled.payer_balance == 0


def _terminate_all_but_mine(url: str) -> int:
    """End every other connection to the database at ``url`` (as a restart or a failover
    would); waits until each is gone. How many there were."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert all(row[0] for row in rows)
    return len(rows)


async def test_connections_postgresql_dropped_cost_no_request_an_error(
    postgres_url: str,
) -> None:
    """Issue 22.3: the first read and the first batch on a pooled connection that PostgreSQL
    dropped are tried once more on a new one, not answered internal_error."""
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=100, bob=0)
        async with trio.open_nursery() as nursery:  # both readers in the pool
            for _ in range(2):
                nursery.start_soon(ledger.balance, "alice")
        assert _terminate_all_but_mine(postgres_url) == 3  # the writer and two readers
        assert await ledger.balance("alice") == 100
        assert (await ledger.settle(uuid.uuid4(), "alice", "bob", 10)).payer_balance == 90
        async with trio.open_nursery() as nursery:  # the other, dead reader too
            for _ in range(2):
                nursery.start_soon(ledger.balance, "alice")
        assert (await ledger.audit()).transfers == 1 and ledger.reconnected >= 2


async def test_a_connection_lost_during_commit_fails_its_batch(postgres_url: str) -> None:
    """A batch whose connection is lost while its COMMIT is on the way is not tried again:
    nobody can tell whether it committed. (Here it did not; the caller's retry, by payment
    id, settles it once.)"""
    async with open_postgres_ledger(postgres_url) as ledger:
        await funded(ledger, alice=100, bob=0)
        db = ledger._db
        assert db is not None
        commit = db.commit

        def lost_commit() -> None:
            _terminate_all_but_mine(postgres_url)
            commit()

        db.commit = lost_commit  # type: ignore[method-assign]
        pid = uuid.uuid4()
        with pytest.raises(lg.LedgerUnavailable, match="commit failed"):
            await ledger.settle(pid, "alice", "bob", 10)
        assert ledger.reconnected == 0 and (await ledger.audit()).transfers == 0
        assert (await ledger.settle(pid, "alice", "bob", 10)).payer_balance == 90


async def test_a_deadlocked_batch_is_retried_whole(postgres_url: str) -> None:
    """Operations other than settles lock accounts in queue order, so two nodes' batches can
    deadlock; PostgreSQL aborts one of them, which the ledger tries again, whole, without
    bothering its callers. (Logins here: deposits would also queue on the issuance row.)"""
    async with (
        open_postgres_ledger(postgres_url) as a,
        open_postgres_ledger(postgres_url) as b,
    ):
        await funded(a, x=0, y=0, gate_a=0, gate_b=0, busy_a=0, busy_b=0)
        with psycopg.connect(postgres_url) as gates, psycopg.connect(postgres_url) as busy:
            gates.execute("SELECT 1 FROM accounts WHERE name LIKE 'gate%' FOR UPDATE")
            busy.execute("SELECT 1 FROM accounts WHERE name LIKE 'busy%' FOR UPDATE")
            busy_done = [trio.Event(), trio.Event()]

            async def login_then(node: PostgresLedger, name: str, done: trio.Event) -> None:
                await node.record_login(name)
                done.set()

            async with trio.open_nursery() as nursery:
                # Each writer waits on its busy row, while its next batch queues up behind:
                # a locks y then waits on its gate then wants x; b the other way round.
                for node, first, gate, then, done in (
                    (a, "y", "gate_a", "x", busy_done[0]),
                    (b, "x", "gate_b", "y", busy_done[1]),
                ):
                    nursery.start_soon(login_then, node, "busy_" + gate[-1], done)
                    await trio.testing.wait_all_tasks_blocked()
                    for name in (first, gate, then):
                        nursery.start_soon(node.record_login, name)
                        await trio.testing.wait_all_tasks_blocked()
                busy.commit()  # both next batches start, and stop at their gates
                with trio.fail_after(10):
                    for done in busy_done:
                        await done.wait()
                    # (PostgreSQL has no event to wait for: its activity view is polled)
                    while await trio.to_thread.run_sync(_waiting_on_locks, busy) < 2:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                gates.commit()  # now a waits for x (b has it) and b for y (a has it)
        # At least once; maybe more, when the victim's retry takes a row back before the
        # survivor gets it. Every caller was answered without an error all the same.
        assert 1 <= a.retries + b.retries < lg.postgres.RETRIES
    with psycopg.connect(postgres_url) as db:
        logged = db.execute("SELECT name FROM accounts WHERE last_login_ms IS NOT NULL").fetchall()
    assert sorted(row[0] for row in logged) == ["busy_a", "busy_b", "gate_a", "gate_b", "x", "y"]


def _waiting_on_locks(db: psycopg.Connection[tuple[object, ...]]) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    db.rollback()
    return 0 if row is None else int(str(row[0]))


@pytest.mark.parametrize(
    "text",
    [
        'not a usable PostgreSQL URL: "postgresql://postgres:s3cret@[::1:5999/x"',
        "there is no ledger at host=127.0.0.1 port=5999 password=s3cret dbname=x",
        "password = 's3cret' host=h",
        "postgres://op:s3cret@db.example/p2ppay refused",
    ],
)
def test_no_message_carries_a_password(text: str) -> None:
    from p2ppay.ledger.pgschema import redact

    shown = redact(text)
    assert "s3cret" not in shown and "***" in shown


async def test_a_database_that_does_not_keep_utf8_is_refused_in_one_line() -> None:
    """Review of issue 22: on an SQL_ASCII database every login answered auth_failed (text
    came back as bytes); now the ledger refuses it at open, saying what to do."""
    from .pgdb import SKIP_REASON, admin_dsn, fresh_database

    dsn = admin_dsn()
    if dsn is None:
        pytest.skip(SKIP_REASON)
    with (
        fresh_database(dsn, sql_ascii=True) as url,
        pytest.raises(lg.LedgerUnavailable, match="keeps text as SQL_ASCII; p2ppay needs UTF8"),
    ):
        async with open_postgres_ledger(url):
            pass  # pragma: no cover
