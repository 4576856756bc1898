"""Issue 13 on PostgreSQL beyond what the shared ledger tests cover: the schema's version 1 is
upgraded with everything in it, and two nodes paying one request, or making one deposit, at
the same moment move money once."""

from __future__ import annotations

import uuid

import psycopg
import trio
from psycopg.types.json import Jsonb

from p2ppay import ledger as lg
from p2ppay.ledger import PostgresLedger, open_postgres_ledger
from p2ppay.ledger.pgschema import _MIGRATIONS


async def test_a_version_1_database_is_upgraded_with_everything_in_it(postgres_url: str) -> None:
    pid = uuid.uuid4()
    with psycopg.connect(postgres_url, autocommit=False) as db:
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("CREATE TABLE p2ppay_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO p2ppay_schema(version) VALUES (1)")
        for name in ("alice", "bob"):
            db.execute(
                "INSERT INTO accounts(name, name_key, kind, balance, created_ms)"
                " VALUES (%s, %s, 'native', 0, 1)",
                (name, name),
            )
        db.execute(
            "INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms)"
            " VALUES ('deposit', 'alice', 100, 100, 2)"
        )
        db.execute("UPDATE accounts SET balance = 100 WHERE name = 'alice'")
        db.execute("UPDATE issuance SET balance = -100")
        batch = [{"pid": str(pid), "payer_key": "alice", "payee_key": "bob", "amount": 40,
                  "key": None}]  # fmt: skip
        (code, *_) = db.execute(
            "SELECT * FROM p2ppay_settle_batch(%s, 1000, 1000, 3)", (Jsonb(batch),)
        ).fetchone() or ("none",)
        assert code == "ok"
        db.commit()
    async with open_postgres_ledger(postgres_url) as ledger:
        history = await ledger.history("bob", 10)
        assert [(e.kind, e.amount, e.memo, e.payment_id) for e in history] == [
            ("received", 40, None, pid)
        ]
        again = await ledger.settle(pid, "alice", "bob", 40)
        assert again.replayed and again.memo is None
        paid = await ledger.settle(uuid.uuid4(), "alice", "bob", 5, memo="tea")
        assert paid.memo == "tea" and not paid.replayed
        rid = uuid.uuid4()
        await ledger.create_request(rid, "bob", "alice", 1, "x", 2**52, 10, 10)
        transfer, request = await ledger.pay_request(rid, "alice")
        assert (transfer.memo, request.state) == ("x", "paid")
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT version FROM p2ppay_schema").fetchall() == [
            (lg.PG_SCHEMA_VERSION,)
        ]


async def test_two_nodes_paying_one_request_or_making_one_deposit_move_money_once(
    postgres_url: str,
) -> None:
    async with (
        open_postgres_ledger(postgres_url) as one,
        open_postgres_ledger(postgres_url) as two,
    ):
        for name in ("alice", "bob"):
            await one.create_account(name, "hash")
        await one.deposit("alice", 1000)
        rids = [uuid.uuid4() for _ in range(20)]
        for rid in rids:
            await one.create_request(rid, "bob", "alice", 7, None, 2**52, 100, 100)
        dids = [uuid.uuid4() for _ in range(20)]
        paid: list[lg.Transfer] = []
        deposited: list[int] = []

        async def pay(node: PostgresLedger, rid: uuid.UUID) -> None:
            paid.append((await node.pay_request(rid, "alice"))[0])

        async def deposit(node: PostgresLedger, did: uuid.UUID) -> None:
            deposited.append(await node.deposit("bob", 3, did))

        async with trio.open_nursery() as nursery:
            for rid, did in zip(rids, dids, strict=True):
                for node in (one, two):
                    nursery.start_soon(pay, node, rid)
                    nursery.start_soon(deposit, node, did)
        assert len(paid) == 40 and sum(not t.replayed for t in paid) == 20
        assert len(deposited) == 40
        audit = await two.audit()
        assert audit.conserved and audit.transfers == 20
        assert audit.total_deposits == 1000 + 3 * 20
        bob = await one.account("bob")
        assert bob is not None and bob.balance == 7 * 20 + 3 * 20
