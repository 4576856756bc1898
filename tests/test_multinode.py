"""Several server nodes on one PostgreSQL database: shared presence, events and take-over
across nodes, exactly-once across nodes, a node that dies, and the real CLI doing all of it.

Every test needs PostgreSQL (``postgres_url``: a fresh database each, skipped without
``P2PPAY_TEST_POSTGRES``). Nodes run in process (two :class:`Server` on one database, each with
its own ledger connections and :class:`PgPresence`) or as real ``p2ppay server`` processes.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost
from p2ppay.client.peer import accept_all
from p2ppay.client.wallet import Wallet
from p2ppay.ledger import AnyLedger, open_ledger
from p2ppay.pki import Issuer
from p2ppay.presence.postgres import PgPresence, open_pg_presence
from p2ppay.server import Server, ServerConfig
from p2ppay.tls import client_context
from p2ppay.wire import course

from .conftest import FAST_SCRYPT, PASSWORD, expect_error, login, next_event, pay, registered
from .pgdb import SKIP_REASON, admin_dsn, fresh_database
from .processes import Proc, spawn
from .test_course import KEY, CourseClient, roster

#: short, so that a dead node is noticed within seconds (defaults: 5 s and 15 s)
HEARTBEAT = 0.2
EXPIRY = 1.0


@dataclass
class Node:
    server: Server
    presence: PgPresence
    ledger: AnyLedger
    port: int


@asynccontextmanager
async def pg_node(
    url: str,
    server_ctx: ssl.SSLContext,
    issuer: Issuer,
    *,
    heartbeat: float = HEARTBEAT,
    expiry: float = EXPIRY,
) -> AsyncIterator[Node]:
    """A server node on the database at ``url``, listening on a loopback port."""
    async with (
        open_ledger(url) as ledger,
        open_pg_presence(url, heartbeat=heartbeat, expiry=expiry) as presence,
    ):
        server = Server(
            ledger,
            server_ctx,
            issuer,
            ServerConfig(scrypt=FAST_SCRYPT),
            server_public_key=KEY,
            presence=presence,
        )
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, listeners)
            yield Node(server, presence, ledger, listeners[0].socket.getsockname()[1])
            server.shutdown()


Connect = Callable[[], AbstractAsyncContextManager[Client]]


def connect_to(node: Node, client_ctx: ssl.SSLContext) -> Connect:
    def connect() -> AbstractAsyncContextManager[Client]:
        return Client.connect(
            "127.0.0.1", node.port, ssl_context=client_ctx, server_hostname="localhost"
        )

    return connect


@asynccontextmanager
async def client_on(node: Node, client_ctx: ssl.SSLContext) -> AsyncIterator[Client]:
    async with Client.connect(
        "127.0.0.1", node.port, ssl_context=client_ctx, server_hostname="localhost"
    ) as client:
        yield client


@asynccontextmanager
async def two_nodes(
    url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> AsyncIterator[tuple[Node, Node, Client, Client]]:
    """Two nodes on the database at ``url`` and a client connected to each (node 1's first)."""
    async with (
        pg_node(url, server_ctx, issuer) as n1,
        pg_node(url, server_ctx, issuer) as n2,
        client_on(n1, client_ctx) as first,
        client_on(n2, client_ctx) as second,
    ):
        yield n1, n2, first, second


async def eventually(check: Callable[[], object | Awaitable[object]], within: float = 10) -> None:
    """Wait until ``check()`` is true (or its awaitable gives true): a condition that comes with
    time (a heartbeat, an expiry) or from PostgreSQL, with nothing in this process to wait on,
    so it is polled; the test fails after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(0.05)


async def listed(who: Client | Wallet, *names: str) -> None:
    """Wait until ``who``'s node lists ``names`` online: a login on another node is written
    (and so seen here) a moment after it is answered."""

    async def check() -> bool:
        return set(names) <= {u.name for u in (await who.list()).online}

    await eventually(check)


async def payment_received(wallet: Wallet, within: float = 10) -> p.PaymentReceived:
    with trio.fail_after(within):
        async for event in wallet.events:
            if isinstance(event, p.PaymentReceived):
                return event
    raise AssertionError("the wallet's events ended")


# --- in-process nodes ------------------------------------------------------------------------


async def test_alice_on_node_1_pays_bob_on_node_2_over_p2p(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
            Wallet.using(
                connect_to(n1, client_ctx), policy=accept_all, listen_host="127.0.0.1"
            ) as alice,
            Wallet.using(
                connect_to(n2, client_ctx), policy=accept_all, listen_host="127.0.0.1"
            ) as bob,
        ):
            await alice.register("alice", PASSWORD)
            await alice.login("alice", PASSWORD)
            await alice.deposit(100)
            await bob.register("bob", PASSWORD)
            await bob.login("bob", PASSWORD)
            # node 1 finds bob (connected to node 2) and lists both
            await listed(alice, "bob")
            assert [u.name for u in (await alice.list()).online] == ["alice", "bob"]
            paid = await alice.pay("bob", 30)  # looked up and settled on node 1
            assert paid.balance == 70
            event = await payment_received(bob)  # told on node 2
            assert (event.payment_id, event.payer, event.amount, event.balance) == (
                paid.payment_id,
                "alice",
                30,
                30,
            )
            assert await bob.balance() == 30


async def test_the_payee_is_told_once_on_either_node(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """The settling node does not push an event itself (its listener gets the ledger's
    notification like every node's): a payee on the settling node, or on the other, hears
    of each payment once."""
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
            client_on(n1, client_ctx) as alice,
            client_on(n1, client_ctx) as bob,
            client_on(n2, client_ctx) as carol,
        ):
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            await registered(carol, "carol")
            for payee, client in (("bob", bob), ("carol", carol)):
                result = await pay(alice, payee, 10)
                event = await next_event(client)
                assert isinstance(event, p.PaymentReceived)
                assert event.payment_id == result.payment_id
                with trio.move_on_after(0.5) as quiet:
                    await client.next_event()
                assert quiet.cancelled_caught, f"{payee} was told twice"


async def test_a_transfer_is_heard_by_the_payees_node_alone(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """The ledger announces a transfer on the payee's node's channel: the other node does not
    even parse it (every node parsing every transfer grew with the number of nodes)."""
    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (n1, n2, alice, bob):
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            await listed(alice, "bob")  # bob's row is written: the ledger knows his node
            heard = n1.presence.transfers_heard, n2.presence.transfers_heard
            result = await pay(alice, "bob", 10)
            event = await next_event(bob)
            assert isinstance(event, p.PaymentReceived)
            assert event.payment_id == result.payment_id
            with trio.move_on_after(0.5):  # time for a stray copy to reach node 1
                await next_event(alice)
            assert (n1.presence.transfers_heard, n2.presence.transfers_heard) == (
                heard[0],
                heard[1] + 1,
            )


@dataclass(eq=False)
class FakeSession:
    """What presence needs of a session (server.presence.Member), recording what it is told."""

    user: str
    ip: str = "127.0.0.1"
    listed_port: int | None = 1
    paid_amounts: list[int] = field(default_factory=list)

    def replaced(self, by_ip: str) -> None:
        pass

    def paid(self, transfer: lg.Transfer) -> None:
        self.paid_amounts.append(transfer.amount)

    def told(self, line: bytes) -> None:
        pass

    def push(self, event: p.Event) -> None:
        pass


async def test_a_payee_who_moved_node_before_its_row_did_still_hears(postgres_url: str) -> None:
    """bob's row still names node A (its writer is held up) when bob, reconnected to node B,
    is paid: the ledger tells A, which does not have him and says it again to every node."""
    async with (
        open_ledger(postgres_url) as ledger,
        open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as a,
        open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as b,
    ):
        for name in ("alice", "bob"):
            await ledger.create_account(name, "h")
        await ledger.deposit("alice", 100)

        def row_node() -> object:
            with psycopg.connect(postgres_url) as db:
                row = db.execute("SELECT node_id FROM presence WHERE name_key = 'bob'").fetchone()
            return None if row is None else row[0]

        bob_on_a = FakeSession("bob")
        a.take_over(bob_on_a)
        await eventually(lambda: row_node() == a.node_id)
        with psycopg.connect(postgres_url) as hold:  # a slow presence writer, or PostgreSQL
            hold.execute("SELECT 1 FROM presence WHERE name_key = 'bob' FOR UPDATE")
            a.forget(bob_on_a)  # bob's connection to A drops; he logs in on B
            bob_on_b = FakeSession("bob")
            b.take_over(bob_on_b)
            with trio.fail_after(10):  # (the settle only reads the row: it does not wait)
                await ledger.settle(uuid.uuid4(), "alice", "bob", 10)
            assert row_node() == a.node_id
            hold.rollback()
        await eventually(lambda: bob_on_b.paid_amounts == [10])
        assert bob_on_a.paid_amounts == []


async def test_payment_request_news_reaches_each_party_on_its_node(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """alice (node 1) asks bob (node 2): bob hears of the request at once; alice hears when
    bob pays or declines it, bob when alice cancels one; each once, and alice not again at
    her next login."""

    async def news(client: Client, kind: type[p.Event]) -> p.RequestInfo:
        with trio.fail_after(10):
            while not isinstance(event := await client.next_event(), kind):
                assert isinstance(event, p.PaymentReceived), event  # (alice is paid too)
        assert isinstance(event, p.PaymentRequested | p.RequestClosed)
        return event.request

    async def quiet(client: Client) -> None:
        with trio.move_on_after(0.5) as nothing:
            event = await client.next_event()
            raise AssertionError(f"told again: {event}")
        assert nothing.cancelled_caught

    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (_, n2, alice, bob):
            await registered(alice, "alice")
            await registered(bob, "bob", deposit=100)
            asked = await alice.request("bob", 30, "lunch")
            heard = await news(bob, p.PaymentRequested)
            assert heard == asked
            await quiet(bob)
            paid = await bob.pay_request(asked.request_id)
            closed = await news(alice, p.RequestClosed)
            assert (closed.request_id, closed.state, closed.memo) == (
                paid.payment_id,
                "paid",
                "lunch",
            )
            await quiet(alice)

            declined = await alice.request("bob", 5)
            assert (await news(bob, p.PaymentRequested)).request_id == declined.request_id
            await bob.decline_request(declined.request_id)
            closed = await news(alice, p.RequestClosed)
            assert (closed.request_id, closed.state) == (declined.request_id, "declined")

            cancelled = await alice.request("bob", 7)
            assert (await news(bob, p.PaymentRequested)).request_id == cancelled.request_id
            await alice.cancel_request(cancelled.request_id)
            closed = await news(bob, p.RequestClosed)
            assert (closed.request_id, closed.state) == (cancelled.request_id, "cancelled")
            await quiet(bob)
            assert await bob.balance() == 70

            # alice heard of the paid and the declined request on node 1, so her next login
            # has no news of them (node 1 marked them told; node 2 could not know).
            def told() -> bool:
                with psycopg.connect(postgres_url) as db:
                    rows = db.execute("SELECT bool_and(told) FROM payment_requests").fetchall()
                return rows == [(True,)]

            await eventually(told)
            async with client_on(n2, client_ctx) as again:
                assert (await login(again, "alice")).request_news == []


async def test_a_retry_on_the_other_node_gets_the_stored_outcome(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (n1, n2, alice1, bob):
            await registered(alice1, "alice", deposit=100)
            await registered(bob, "bob")
            pid = uuid.uuid4()
            first = await pay(alice1, "bob", 25, pid)
            await next_event(bob)
            async with client_on(n2, client_ctx) as alice2:
                await alice2.login("alice", PASSWORD)  # (no new key: bob's signs)
                assert await pay(alice2, "bob", 25, pid) == first
                assert (await alice2.list()).balance == 75
            with trio.move_on_after(0.5) as quiet:
                await bob.next_event()
            assert quiet.cancelled_caught, "a replay was announced as a new payment"
            audit = await n1.ledger.audit()
            assert audit.conserved and audit.transfers == 1


async def test_one_payment_id_settled_at_both_nodes_at_once_is_applied_once(
    postgres_url: str, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """Each payment is handed to both nodes' ledgers at the same moment: one applies it, the
    other answers with the stored outcome."""
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
        ):
            await n1.ledger.create_account("alice", None, "native", 1000)
            await n2.ledger.create_account("bob", None, "native", 1000)
            results: dict[uuid.UUID, list[bool]] = {}

            async def settle(node: Node, pid: uuid.UUID, amount: int) -> None:
                t = await node.ledger.settle(pid, "alice", "bob", amount)
                assert (t.payer, t.payee, t.amount) == ("alice", "bob", amount)
                results.setdefault(pid, []).append(t.replayed)

            pids = [uuid.uuid4() for _ in range(40)]
            async with trio.open_nursery() as nursery:
                for i, pid in enumerate(pids):
                    nursery.start_soon(settle, n1, pid, 1 + i % 9)
                    nursery.start_soon(settle, n2, pid, 1 + i % 9)
            assert all(sorted(r) == [False, True] for r in results.values()), results
            audit = await n2.ledger.audit()
            assert audit.conserved and audit.transfers == 40
            alice = await n1.ledger.account("alice")
            assert alice is not None and alice.balance == 1000 - sum(1 + i % 9 for i in range(40))


async def test_a_login_on_node_2_closes_the_session_on_node_1(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
            client_on(n1, client_ctx) as old,
            client_on(n2, client_ctx) as new,
            client_on(n1, client_ctx) as watcher,
        ):
            await registered(old, "alice", p2p_port=9001)
            await registered(watcher, "watcher")
            assert await watcher.lookup("alice") == p.Presence("alice", "127.0.0.1", 9001)
            await login(new, "alice", p2p_port=9002)
            event = await next_event(old)
            assert isinstance(event, p.SessionReplaced)
            with pytest.raises(ConnectionLost):
                await next_event(old)
            await eventually(lambda: n1.server.presence.local("alice") is None)
            # node 1 now finds alice where she logged in last, and only there
            assert await watcher.lookup("alice") == p.Presence("alice", "127.0.0.1", 9002)
            assert [u.port for u in (await watcher.list()).online if u.name == "alice"] == [9002]
            # The new session is unharmed: it settles with its new key from node 1's view too.
            await new.deposit(5)
            assert (await pay(new, "watcher", 5)).balance == 0


async def test_logins_and_logouts_elsewhere_are_seen_at_once_despite_the_list_cache(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """A node keeps what it read of the others until something changes: every login and
    logout is announced, so the cache is dropped at once, not after a heartbeat (long here)."""
    slow = {"heartbeat": 30.0, "expiry": 90.0}
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer, **slow) as n1,
            pg_node(postgres_url, server_ctx, issuer, **slow) as n2,
            client_on(n1, client_ctx) as alice,
            client_on(n2, client_ctx) as bob,
        ):
            await registered(alice, "alice")
            assert [u.name for u in (await alice.list()).online] == ["alice"]  # now cached
            await registered(bob, "bob", p2p_port=9002)
            await listed(alice, "bob")
            assert await alice.lookup("bob") == p.Presence("bob", "127.0.0.1", 9002)
            await bob.logout()

            async def bob_gone() -> bool:
                return [u.name for u in (await alice.list()).online] == ["alice"]

            await eventually(bob_gone, within=5)
            await expect_error("payee_offline", alice.lookup("bob"))


async def test_a_login_answered_on_one_node_is_found_at_once_on_the_other(
    postgres_url: str,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read-your-writes across nodes (issue 22.4): once node 2 has answered bob's login, node 1
    finds him at once, in both dialects, though node 1 has not heard of the login (its
    notifications are held back here) and has read who is online just before (kept a
    heartbeat, long here): a login is answered once its row is written, and a miss is asked
    of the database before it is told."""
    slow = {"heartbeat": 30.0, "expiry": 90.0}
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer, **slow) as n1,
            pg_node(postgres_url, server_ctx, issuer, **slow) as n2,
            client_on(n1, client_ctx) as alice,
            client_on(n2, client_ctx) as bob,
            course_client(n1, "10.0.0.1") as carol,
            course_client(n2, "10.0.0.2") as dave,
        ):
            for node in (n1, n2):
                node.server.course_dialect = course.SEED
            await registered(alice, "alice", deposit=50)
            await bob.register("bob", PASSWORD)
            await carol.exchange(b"REGISTER#carol#5001", b"100 OK\n")
            await carol.exchange(b"dave", b"Failed: unknown payee\n")  # (read, and kept)
            held: list[tuple[str, str]] = []
            monkeypatch.setattr(n1.presence, "_on_notifies", held.extend)  # node 1 hears nothing
            await dave.exchange(b"REGISTER#dave#5002", b"100 OK\n")
            await carol.exchange(b"dave", b"On#10.0.0.2#5002\n")
            await expect_error("payee_offline", alice.lookup("bob"))  # (read, and kept)
            await login(bob, "bob", p2p_port=9002)
            assert await alice.lookup("bob") == p.Presence("bob", "127.0.0.1", 9002)
            paid = await pay(alice, "bob", 10)
            event = await next_event(bob)
            assert isinstance(event, p.PaymentReceived) and event.payment_id == paid.payment_id
            assert any('"login"' in payload for _, payload in held)  # (it was held back)


async def test_lookup_and_list_see_every_live_node_and_forget_a_dead_one(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """A node whose heartbeat stops (here: stopped without leaving, as a crash would) is
    ignored once it is older than the expiry, and its rows are deleted."""
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            client_on(n1, client_ctx) as alice,
        ):
            await registered(alice, "alice", p2p_port=9001)
            await n1.ledger.create_account("bob", None)
            crashed = PgPresence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY)
            await crashed.start()
            async with trio.open_nursery() as nursery:
                await nursery.start(crashed._writer)
                await nursery.start(crashed._listener)
                nursery.start_soon(crashed._heartbeats)
                crashed.take_over(_Member("bob", "10.0.0.2", 9002))
                await eventually(lambda: crashed._seqs)
                assert await alice.lookup("bob") == p.Presence("bob", "10.0.0.2", 9002)
                names = [u.name for u in (await alice.list()).online]
                assert names == ["alice", "bob"]
                # The crash: no more heartbeats, no goodbye.
                before = n1.presence.generation
                crashed._stop.set()
                nursery.cancel_scope.cancel()
            assert crashed._write_conn is not None
            crashed._write_conn.close()
            gone_at = trio.current_time()

            async def only_alice() -> bool:
                return [u.name for u in (await alice.list()).online] == ["alice"]

            await eventually(only_alice)
            assert trio.current_time() - gone_at <= EXPIRY + 5  # (a loaded machine)
            await expect_error("payee_offline", alice.lookup("bob"))
            # and its rows are gone from the table (another node's heartbeat deleted them)
            await eventually(lambda: _rows(postgres_url, crashed.node_id) == 0, within=5)
            # The node that deleted them counts that as a change (what was derived is stale),
            # once back from the commit that the check above may see first.
            await eventually(lambda: n1.presence.generation > before, within=5)


async def test_a_node_taken_for_dead_puts_its_users_back(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """Cut off from PostgreSQL for longer than the expiry, a node is deleted by the others;
    its next heartbeat restores its sessions' rows (none was taken by a newer login)."""
    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (_, n2, alice, bob):
            await registered(alice, "alice", p2p_port=9001)
            await registered(bob, "bob", p2p_port=9002)
            await eventually(lambda: _rows(postgres_url, n2.presence.node_id) == 1)
            with psycopg.connect(postgres_url, autocommit=True) as db:
                db.execute("DELETE FROM nodes WHERE node_id = %s", (n2.presence.node_id,))
            assert _rows(postgres_url, n2.presence.node_id) == 0  # cascaded
            await eventually(lambda: _rows(postgres_url, n2.presence.node_id) == 1, within=5)
            assert await alice.lookup("bob") == p.Presence("bob", "127.0.0.1", 9002)


async def test_presence_reconnects_when_its_connections_are_cut(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """Every presence connection of node 2 is cut (as a PostgreSQL restart or a network blip
    would): its writer and its listener connect again, and the nodes work together again."""
    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (_, n2, alice, bob):
            await registered(alice, "alice", deposit=50)
            await registered(bob, "bob")
            await listed(alice, "bob")
            await listed(bob, "alice")  # (node 2 has a reader connection now)
            app = f"p2ppay presence {n2.presence.node_id}"[:63]
            cut = _cut(postgres_url, app)
            assert len(cut) == 3  # the writer, the listener, a reader

            def listening_again() -> bool:
                with psycopg.connect(postgres_url) as db:
                    rows = db.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                        "AND query LIKE 'LISTEN%%'",
                        (app,),
                    ).fetchall()
                return any(pid not in cut for (pid,) in rows)

            await eventually(listening_again)
            result = await pay(alice, "bob", 20)
            event = await next_event(bob)  # through node 2's new listening connection
            assert isinstance(event, p.PaymentReceived)
            assert event.payment_id == result.payment_id
            async with client_on(n2, client_ctx) as carol:
                await registered(carol, "carol")  # written by node 2's new connection
                await listed(alice, "carol")
            # node 2's readers were cut too: its first read connects anew, not a failure
            assert await bob.lookup("alice") == p.Presence("alice", "127.0.0.1", None)


def _listening(url: str, presence: PgPresence) -> set[int]:
    """The server process ids of ``presence``'s LISTEN connections that listen on all
    three channels."""
    with psycopg.connect(url) as db:
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query = %s",
            (f"p2ppay presence {presence.node_id}"[:63], f"LISTEN {presence.channel}"),
        ).fetchall()
    return {int(pid) for (pid,) in rows}


async def test_a_frozen_listen_connection_is_noticed_within_two_heartbeats(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22.2: node A's LISTEN backend is stopped (SIGSTOP): nothing fails, the socket
    stays open, and A would never hear another login, line or payment. A's next heartbeat's
    probe goes unheard, so within two heartbeats A says so once, connects its listener anew,
    and hears again (a course line relayed by B) while the old backend is still stopped."""
    heartbeat = 1.0
    with trio.fail_after(60):
        async with (
            open_pg_presence(
                postgres_url, heartbeat=heartbeat, expiry=10.0, listen_timeout=0.3
            ) as a,
            open_pg_presence(postgres_url, heartbeat=heartbeat, expiry=10.0) as b,
        ):
            carol = _Member("carol", "10.0.0.3", 5003)
            a.take_over(carol, course=True)
            await a.published(carol, course=True)
            (frozen,) = _listening(postgres_url, a)
            try:
                os.kill(frozen, signal.SIGSTOP)
            except (PermissionError, ProcessLookupError):
                pytest.skip("needs to signal the PostgreSQL server's processes (same host)")
            try:
                stopped_at = trio.current_time()
                await eventually(lambda: a.deaf == 1)
                noticed = trio.current_time() - stopped_at
                assert noticed <= 2 * heartbeat, f"noticed after {noticed:.2f} s"
                await eventually(lambda: bool(_listening(postgres_url, a) - {frozen}))
                b.tell_course("carol", b"Transfer OK!\n")
                await eventually(lambda: carol.lines == [b"Transfer OK!\n"])
                assert a.deaf == 1
            finally:
                os.kill(frozen, signal.SIGCONT)
    said = [r for r in caplog.records if "did not hear this node's heartbeat" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


async def test_a_frozen_presence_backend_costs_a_login_or_lookup_one_statement_timeout(
    postgres_url: str,
) -> None:
    """Issue 22.2, who is online: node A's presence writer's backend is stopped (SIGSTOP), then
    a reader's. A login is still answered within the statement timeout (its row is written by
    a new connection soon after, while the old backend is still stopped), and a lookup that
    must ask PostgreSQL is answered "cannot be read just now" in that time, not when the backend
    wakes; the next one connects anew."""
    from .test_pgtimeouts import stopped

    timeouts = lg.PgTimeouts(statement_timeout=1.0, lock_timeout=0.5)
    bound = 3.0  # the statement timeout, and the thread hops around it on a busy machine
    with trio.fail_after(60):
        async with (
            open_pg_presence(postgres_url, heartbeat=30.0, expiry=90.0, timeouts=timeouts) as a,
            open_pg_presence(postgres_url, heartbeat=30.0, expiry=90.0) as b,
        ):
            carol = _Member("carol", "10.0.0.3", 5003)
            a.take_over(carol)
            await a.published(carol)
            assert a._write_conn is not None
            with stopped(a._write_conn.info.backend_pid):
                dave = _Member("dave", "10.0.0.4", 5004)
                started = trio.current_time()
                a.take_over(dave)
                await a.published(dave)
                took = trio.current_time() - started
                assert took <= bound, f"the login waited {took:.2f} s"
                await eventually(lambda: not a._unwritten)  # written by a new connection
                assert await b.lookup("dave") == p.Presence("dave", "10.0.0.4", 5004)
            assert await b.lookup("nobody") is None  # (b's reader connected)
            assert await a.lookup("nobody") is None  # (a's reader connected)
            (reader,) = a._idle_readers
            with stopped(reader.info.backend_pid):
                started = trio.current_time()
                with pytest.raises(lg.LedgerUnavailable):
                    await a.lookup("nobody")
                took = trio.current_time() - started
                assert took <= bound, f"the lookup waited {took:.2f} s"
                assert await a.lookup("nobody") is None  # a new reader, while the old is stopped


async def test_a_lost_take_over_notification_is_made_good_by_the_heartbeat(
    postgres_url: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """A newer login elsewhere whose notification never arrived (a listener reconnecting):
    the node's heartbeat finds its row taken, and closes its session."""
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            client_on(n1, client_ctx) as alice,
        ):
            await registered(alice, "alice", p2p_port=9001)
            await eventually(lambda: _rows(postgres_url, n1.presence.node_id) == 1)
            with psycopg.connect(postgres_url, autocommit=True) as db:
                db.execute("INSERT INTO nodes VALUES ('elsewhere', 1e15)")  # alive "forever"
                db.execute(
                    "UPDATE presence SET node_id = 'elsewhere', ip = '10.9.9.9', "
                    "login_seq = nextval('presence_login_seq') WHERE name_key = 'alice'"
                )
            event = await next_event(alice)
            assert isinstance(event, p.SessionReplaced) and "another node" in event.message
            assert n1.server.presence.local("alice") is None


async def test_logins_at_once_on_two_nodes_leave_exactly_one_session(postgres_url: str) -> None:
    """Two logins of one name at the same moment on two nodes: the one with the higher login
    number keeps the name on both nodes (its row, its session); the other is replaced, and
    never both."""
    with trio.fail_after(60):
        async with (
            open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as a,
            open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as b,
        ):
            for attempt in range(8):
                on_a = _Member("alice", "10.0.0.1", attempt)
                on_b = _Member("alice", "10.0.0.2", attempt)
                a.take_over(on_a)
                b.take_over(on_b)
                await eventually(lambda: on_a.user is None or on_b.user is None)  # noqa: B023
                survivor, node = (on_b, b) if on_a.user is None else (on_a, a)
                await eventually(lambda: _holder(postgres_url, "alice") == node.node_id)  # noqa: B023
                await trio.sleep(0.3)  # room for a wrong second replacement to arrive
                assert survivor.user == "alice", f"attempt {attempt}: both were replaced"
                assert node.local("alice") is survivor
                assert (a if node is b else b).local("alice") is None


async def test_a_line_postgresql_refuses_or_a_forged_event_is_dropped_alone(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A line for another node goes in its own savepoint: one that PostgreSQL refuses (its
    NOTIFY payload too long once JSON-escaped) is dropped and logged, and the login queued
    beside it is still written. A line too long to relay at all is not queued. Events from
    the channel are pushed only if they are ones nodes relay (anyone who may connect to the
    database can NOTIFY)."""
    with trio.fail_after(60):
        async with (
            open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as a,
            open_pg_presence(postgres_url, heartbeat=HEARTBEAT, expiry=EXPIRY) as b,
        ):
            carol, erin = _Member("carol", "10.0.0.3", 0), _Member("erin", "10.0.0.5", 9005)
            b.take_over(carol, course=True)
            b.take_over(erin)
            await eventually(lambda: _holder(postgres_url, "erin") == b.node_id)
            alice = _Member("alice", "10.0.0.1", 9001)
            # In one batch: a line PostgreSQL refuses (5 KB; JSON-escaped, 10 KB), then a
            # login, which must be written all the same.
            a.tell_course("carol", b'"' * 5000 + b"\n")
            a.take_over(alice)
            a.tell_course("carol", b"x" * 9000 + b"\n")  # not even queued
            await eventually(lambda: _holder(postgres_url, "alice") == a.node_id)
            assert "write was refused" not in caplog.text
            a.tell_course("carol", b"Transfer OK!\n")
            await eventually(lambda: carol.lines == [b"Transfer OK!\n"])
            assert alice.user == "alice"
            assert "a line for carol was not relayed" in caplog.text
            assert "too long to relay" in caplog.text

            forged = p.encode_event(p.SessionReplaced("erin logged in from 6.6.6.6"))
            with psycopg.connect(postgres_url, autocommit=True) as db:
                payload = {"kind": "event", "name": "erin", "line": forged.decode()}
                db.execute("SELECT pg_notify('p2ppay_presence', %s)", (json.dumps(payload),))
            info = p.RequestInfo(uuid.uuid4(), "alice", "erin", 5, None, 1, 2, "open")
            a.tell("erin", p.PaymentRequested(info))
            await eventually(lambda: erin.events == [p.PaymentRequested(info)])
            assert "could not be read" in caplog.text


_TRANSFER = {"payment_id": str(uuid.UUID(int=1)), "payer": "alice", "payee": "bob", "amount": 1,
             "payer_balance": 0, "payee_balance": 1, "at_ms": 1}  # fmt: skip
#: what anyone who may connect to the database could NOTIFY: none of it of a shape any channel
#: carries (a well-formed transfer is ill-formed on p2ppay_presence and the other way round,
#: so each is here with a field wrong for both)
MALFORMED = [
    "null", "[1]", '"x"', "1", "true", "{}", "x{", "", r'"\u0000\ud800"',
    '{"kind": "nonsense", "node": "elsewhere"}',
    '{"kind": "logout"}',
    '{"kind": "login", "node": "elsewhere", "name": 1, "course": "no", "seq": "7", "ip": null}',
    '{"kind": "login", "node": "elsewhere", "name": "bob", "course": false, "seq": 1.5, '
    '"ip": "6.6.6.6"}',
    '{"kind": "event", "node": "elsewhere", "name": ["alice"], "line": {}}',
    '{"kind": "line", "node": "elsewhere", "name": "carol", "line": 5}',
    json.dumps({**_TRANSFER, "amount": "10"}),
    json.dumps({**_TRANSFER, "payee": ["bob"]}),
    json.dumps({**_TRANSFER, "payment_id": "not a uuid"}),
    json.dumps({**_TRANSFER, "memo": 5}),
    json.dumps({**_TRANSFER, "amount": 2**70}),
    "[" * 7_900,  # deep (and near PostgreSQL's 8000-byte limit)
    "{" + '"a": ' * 1_300 + "1" + "}" * 1_300,
    '"' + "x" * 7_900 + '"',
]  # fmt: skip


async def test_a_malformed_notification_on_any_channel_is_skipped_and_every_node_serves(
    postgres_url: str,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 22.1: one `pg_notify('p2ppay_presence', 'null')` used to end every node. Each
    payload of a wrong shape, on each channel the nodes listen on, is skipped and logged at
    most once a minute per channel; then both nodes still log users in, find each other's
    users and pay, and their listeners still hear."""
    with trio.fail_after(60):
        async with two_nodes(postgres_url, server_ctx, client_ctx, issuer) as (n1, n2, alice, bob):
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob", deposit=100)
            channels = ["p2ppay_presence", lg.SETTLED_CHANNEL, n1.presence.channel]
            channels.append(n2.presence.channel)
            with psycopg.connect(postgres_url, autocommit=True) as db:
                for channel in channels:
                    for payload in MALFORMED:
                        db.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            each = 3 * len(MALFORMED)  # (a node listens on its own channel, not the other's)
            await eventually(lambda: (n1.presence.skipped, n2.presence.skipped) == (each, each))
            for node, payee in ((n1, "bob"), (n2, "alice")):
                async with client_on(node, client_ctx) as fresh:
                    await registered(fresh, f"new_{payee}", deposit=10)
                    assert (await fresh.lookup(payee)).name == payee
                    await pay(fresh, payee, 10)
            for client, payer in ((alice, "new_alice"), (bob, "new_bob")):
                event = await next_event(client)
                assert isinstance(event, p.PaymentReceived) and event.payer == payer
            for client, to in ((alice, bob), (bob, alice)):
                await pay(client, to.user or "", 5)
                event = await next_event(to)
                assert isinstance(event, p.PaymentReceived) and event.amount == 5
            said = [r for r in caplog.records if "skipped a notification on" in r.getMessage()]
            assert 0 < len(said) <= 2 * 3, [r.getMessage() for r in said]  # per node, channel
            assert "Traceback" not in caplog.text


async def test_a_notification_that_is_not_text_is_skipped_and_the_listener_hears_on() -> None:
    """In a database whose encoding is SQL_ASCII a payload may be any bytes, which psycopg
    cannot decode (its error is no psycopg.Error: it used to end the listener's thread, and so
    the node). Skipped; the listener hears on: a login, a course line."""
    dsn = admin_dsn()
    if dsn is None:
        pytest.skip(SKIP_REASON)
    with fresh_database(dsn, sql_ascii=True) as url, trio.fail_after(60):
        async with (
            open_pg_presence(url, heartbeat=HEARTBEAT, expiry=EXPIRY) as a,
            open_pg_presence(url, heartbeat=HEARTBEAT, expiry=EXPIRY) as b,
        ):
            with psycopg.connect(url, autocommit=True) as db:
                for channel in ("p2ppay_presence", lg.SETTLED_CHANNEL, a.channel):
                    db.execute(
                        "SELECT pg_notify(%s, convert_from('\\xff7b'::bytea, 'SQL_ASCII'))",
                        (channel,),
                    )
            await eventually(lambda: a.skipped >= 1)  # (psycopg drops the rest of a packet)
            carol = _Member("carol", "10.0.0.3", 5003)
            generation = a.generation
            b.take_over(carol, course=True)
            await b.published(carol, course=True)
            await eventually(lambda: a.generation > generation)  # (a heard the login)
            a.tell_course("carol", b"Transfer OK!\n")
            await eventually(lambda: carol.lines == [b"Transfer OK!\n"])


async def test_course_transfer_outcome_reaches_the_payer_on_its_node(
    postgres_url: str, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
            course_client(n1, "10.0.0.1") as carol,
            course_client(n2, "10.0.0.2") as dave,
        ):
            await carol.exchange(b"REGISTER#carol", b"100 OK\n")
            await dave.exchange(b"REGISTER#dave", b"100 OK\n")
            await carol.exchange(b"carol#5001", roster(10000, ("carol", "10.0.0.1", 5001)))
            await eventually(lambda: _rows(postgres_url, n1.presence.node_id) == 1)
            # node 2's roster lists carol, online on node 1, before dave
            await dave.exchange(
                b"dave#5002",
                roster(10000, ("carol", "10.0.0.1", 5001), ("dave", "10.0.0.2", 5002)),
            )
            # dave (the payee, on node 2) forwards carol's transfer; carol hears on node 1
            await dave.send(b"carol#300#dave")
            await carol.expect(b"Transfer OK!\n")
            await dave.send(b"carol#999999#dave")  # more than she has
            await carol.expect(b"Transfer Fail!\n")
            await carol.exchange(
                b"List", roster(9700, ("carol", "10.0.0.1", 5001), ("dave", "10.0.0.2", 5002))
            )
            # a course login on node 2 takes carol's name over: node 1 logs her out
            async with course_client(n2, "10.0.0.3") as again:
                await again.send(b"carol#5003")
                await eventually(lambda: n1.server.presence.local("carol", course=True) is None)
                await carol.exchange(b"List", b"Please login first\n")


async def test_the_seed_payee_lookup_finds_the_payee_on_another_node(
    postgres_url: str, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(60):
        async with (
            pg_node(postgres_url, server_ctx, issuer) as n1,
            pg_node(postgres_url, server_ctx, issuer) as n2,
        ):
            for node in (n1, n2):  # (read by each course connection as it opens)
                node.server.course_dialect = course.SEED

            async def node_2_sees_bill() -> bool:
                return any(name == "bill" for name, _, _ in await n2.presence.course_roster())

            async def node_2_lost_bill() -> bool:
                return not await node_2_sees_bill()

            async with (
                course_client(n1, "10.0.0.1") as bill,
                course_client(n2, "10.0.0.2") as nancy,
            ):
                await bill.exchange(b"REGISTER#bill#1177", b"100 OK\n")
                await nancy.exchange(b"REGISTER#nancy#6688", b"100 OK\n")
                await eventually(node_2_sees_bill)
                await nancy.exchange(b"bill", b"On#10.0.0.1#1177\n")  # online on node 1
                await bill.exchange(b"Exit", b"Bye\n")
                await eventually(node_2_lost_bill)
                await nancy.exchange(b"bill", b"Off\n")


@asynccontextmanager
async def course_client(node: Node, ip: str) -> AsyncIterator[CourseClient]:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.server.handle_course_connection, server_side, ip)
        yield CourseClient(client_side, ip)
        await trio.aclose_forcefully(client_side)


class _Member:
    """A session stand-in for a node run without a server."""

    def __init__(self, user: str, ip: str, port: int) -> None:
        self.user: str | None = user
        self.ip = ip
        self.listed_port: int | None = port
        self.lines: list[bytes] = []
        self.events: list[object] = []

    def replaced(self, by_ip: str) -> None:
        self.user = None

    def paid(self, transfer: object) -> None:
        pass

    def told(self, line: bytes) -> None:
        self.lines.append(line)

    def push(self, event: object) -> None:
        self.events.append(event)


def _holder(url: str, name: str) -> str | None:
    """The node whose row ``name`` is (native), if any."""
    with psycopg.connect(url) as db:
        row = db.execute(
            "SELECT node_id FROM presence WHERE name_key = %s AND NOT course", (name,)
        ).fetchone()
    return None if row is None else str(row[0])


def _cut(url: str, application_name: str) -> set[int]:
    """Terminate the connections named so; their server process ids."""
    with psycopg.connect(url, autocommit=True) as db:
        cut = db.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return {int(pid) for pid, _ in cut}


def _rows(url: str, node_id: str) -> int:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT count(*) FROM presence WHERE node_id = %s", (node_id,)).fetchone()
    assert row is not None
    return int(row[0])


# --- the real command line -------------------------------------------------------------------


def test_an_unreachable_postgresql_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = "postgresql://p2ppay:s3cret@127.0.0.1:1/p2ppay"  # nothing listens on port 1
    cmd = [sys.executable, "-m", "p2ppay", "server", "--port", "0", "--state-dir", str(tmp_path)]
    done = subprocess.run(
        [*cmd, "--ledger", url], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "the ledger cannot be used: cannot connect to PostgreSQL at 127.0.0.1:1/p2ppay" in last
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


@asynccontextmanager
async def node_process(url: str, state: Path) -> AsyncIterator[Proc]:
    cmd = [sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
           "--scrypt-n", "16", "--state-dir", str(state), "--ledger", url,
           "--node-heartbeat", "0.5", "--node-expiry", "3"]  # fmt: skip
    async with spawn(cmd, "listening on 127.0.0.1") as proc:
        yield proc


@pytest.mark.slow
async def test_two_server_processes_on_one_postgresql(postgres_url: str, tmp_path: Path) -> None:
    state = tmp_path / "state"  # one state dir, so one PKI, for both
    with trio.fail_after(120):
        # One after the other: the first creates the CAs, the second uses them.
        async with (
            node_process(postgres_url, state) as node1,
            node_process(postgres_url, state) as node2,
        ):
            ctx = client_context(state / "ca.pem")

            def to(node: Proc) -> Connect:
                def connect() -> AbstractAsyncContextManager[Client]:
                    return Client.connect("127.0.0.1", node.port, ssl_context=ctx)

                return connect

            async with (
                Wallet.using(to(node1), policy=accept_all, listen_host="127.0.0.1") as alice,
                Wallet.using(to(node2), policy=accept_all, listen_host="127.0.0.1") as bob,
            ):
                await alice.register("alice", PASSWORD)
                await alice.login("alice", PASSWORD)
                await alice.deposit(100)
                await bob.register("bob", PASSWORD)
                await bob.login("bob", PASSWORD)
                paid = await alice.pay("bob", 40)  # P2P, settled on node 1
                event = await payment_received(bob)  # told on node 2
                assert event.payment_id == paid.payment_id and event.balance == 40

                # A login on node 2 closes alice's session on node 1.
                async with (
                    to(node1)() as old,
                    to(node2)() as new,
                ):
                    await old.login("alice", PASSWORD)
                    await new.login("alice", PASSWORD)
                    replaced = await next_event(old)
                    assert isinstance(replaced, p.SessionReplaced)

                # kill -9 node 2: bob is gone from list on node 1 within 30 s.
                async with to(node1)() as watcher:
                    await watcher.register("watcher", PASSWORD)
                    await watcher.login("watcher", PASSWORD)
                    names = {u.name for u in (await watcher.list()).online}
                    assert "bob" in names
                    node2.process.kill()
                    assert await node2.process.wait() == -signal.SIGKILL
                    killed_at = trio.current_time()

                    async def bob_gone() -> bool:
                        return "bob" not in {u.name for u in (await watcher.list()).online}

                    await eventually(bob_gone, within=30)
                    # (3 s expiry and at most a heartbeat, give or take)
                    assert trio.current_time() - killed_at < 10
        assert await node1.process.wait() == 0
    for line in node1.log + node2.log:
        assert "Traceback" not in line
    assert any("presence: node" in line for line in node1.log)
