"""Payment requests as an abuse (issue 22.8 and 22.9): making them is rate limited, closed ones
are purged, a payee's terminal shows a flood as a few lines, and throwaway accounts cannot push
a real counterparty's request out of the list a payee is shown."""

from __future__ import annotations

import io
import logging
import math
import sqlite3
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.cli.bursts import BURST_QUIET, SHOWN_PER_CROWD, RequestBurst
from p2ppay.cli.shell import ClientOptions, Shell, format_requests
from p2ppay.cli.terminal import Interrupted, Terminal
from p2ppay.client.connection import Client, ServerError
from p2ppay.client.peer import accept_all
from p2ppay.client.wallet import Wallet
from p2ppay.ledger import AnyLedger, connect_sqlite
from p2ppay.ledger.pgschema import connect_postgres
from p2ppay.logs import LimitLog
from p2ppay.server import ServerConfig
from p2ppay.server.purge import keep_purging, purge_once
from p2ppay.server.throttle import RequestLimit, RequestLimitConfig

from .conftest import FAST_SCRYPT, Connect, pay, registered

#: The requests a payee is shown at most (--max-open-requests): small, so that a dozen
#: throwaway accounts within the default rate limits could fill it many times over.
SHOWN = 20


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(scrypt=FAST_SCRYPT, max_open_requests=SHOWN)


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Time stands still unless a test moves it (so no allowance comes back meanwhile)."""
    return trio.testing.MockClock()


# -- 22.8: the rate limit --


async def test_a_request_and_cancel_flood_makes_only_the_burst(
    frozen_clock: trio.testing.MockClock, connect: Connect
) -> None:
    pair_burst = RequestLimitConfig().request_pair_burst
    async with connect() as alice, connect(ip="10.0.0.66") as mallory:
        await registered(alice, "alice")
        await registered(mallory, "mallory")
        made = limited = 0
        refusals: set[tuple[str, str]] = set()
        for _ in range(2000):
            try:
                request = await mallory.request("alice", 1)
            except ServerError as exc:
                refusals.add((exc.code, exc.message))
                limited += 1
                continue
            made += 1
            await mallory.cancel_request(request.request_id)
        # (600 s / 5: the time stands still, so every refusal says the same)
        message = "too many payment requests made recently; try again in 120 s"
        assert refusals == {("rate_limited", message)}
        assert (made, limited) == (pair_burst, 2000 - pair_burst)
        # The allowance comes back evenly: one request per window / burst.
        frozen_clock.jump(600 / pair_burst)
        await mallory.request("alice", 1)
        with pytest.raises(ServerError) as refused:
            await mallory.request("alice", 1)
        assert refused.value.code == "rate_limited"
        # Another payer is another pair (the requester's own allowance is 30).
        async with connect() as bob:
            await registered(bob, "bob")
        await mallory.request("bob", 1)


def test_the_requester_limit_spans_payers() -> None:
    now = [0.0]
    limit = RequestLimit(RequestLimitConfig(3, 300.0, 2, 600.0), lambda: now[0])
    assert limit.admit("Mallory", "alice") is None
    assert limit.admit("mallory", "ALICE") is None  # names are canonical
    assert limit.admit("mallory", "alice") == pytest.approx(300.0)  # the pair's
    assert limit.admit("mallory", "bob") is None  # the refused pair took nothing
    assert limit.admit("mallory", "carol") == pytest.approx(100.0)  # the requester's 3
    assert limit.admit("eve", "carol") is None  # another requester
    now[0] = 100.0
    assert limit.admit("mallory", "carol") is None
    assert limit.tracked() == {"requesters": 2, "pairs": 4}


# -- 22.8: purging closed requests --


def _request_ids(target: str | Path) -> set[uuid.UUID]:
    if isinstance(target, Path):
        db = sqlite3.connect(target)
        try:
            return {uuid.UUID(row[0]) for row in db.execute("SELECT id FROM payment_requests")}
        finally:
            db.close()
    with psycopg.connect(target) as pg:
        return {row[0] for row in pg.execute("SELECT id FROM payment_requests")}


async def test_purging_removes_old_closed_requests_and_keeps_the_rest(
    ledger: AnyLedger, ledger_target: str | Path
) -> None:
    for name in ("alice", "bob"):
        await ledger.create_account(name, "h")
    await ledger.deposit("alice", 100)
    later = int(time.time() * 1000) + 3_600_000

    async def ask(expires_ms: int = later) -> uuid.UUID:
        rid = uuid.uuid4()
        await ledger.create_request(rid, "bob", "alice", 1, None, expires_ms, 100, 100)
        return rid

    paid, declined, cancelled, kept = [await ask() for _ in range(4)]
    await ask(int(time.time() * 1000) - 1)  # expired
    await ledger.pay_request(paid, "alice")
    await ledger.close_request(declined, "alice", "declined")
    await ledger.close_request(cancelled, "bob", "cancelled")
    everything = _request_ids(ledger_target)
    assert len(everything) == 5
    config = ServerConfig(request_purge_chunk=2)
    # Closed a moment ago, well within the retention period: all kept.
    assert await purge_once(ledger, config) == 0
    assert _request_ids(ledger_target) == everything
    # A retention period later: the closed and the expired go, in chunks of 2; the open one
    # stays, and so does the money the paid one moved.
    future = time.time() + config.request_retention + 60
    assert await purge_once(ledger, config, wall_clock=lambda: future) == 4
    assert _request_ids(ledger_target) == {kept}
    assert [(e.kind, e.amount) for e in await ledger.history("alice", 10)] == [
        ("sent", 1),
        ("deposit", 100),
    ]
    assert (await ledger.audit()).conserved


class _CountingLedger:
    def __init__(self) -> None:
        self.purges = 0

    async def purge_requests(self, closed_before_ms: int, limit: int) -> int:
        await trio.lowlevel.checkpoint()
        self.purges += 1
        if self.purges == 2:
            raise lg.LedgerUnavailable("the disk is full")
        return 0


async def test_the_purge_runs_at_start_and_every_interval_and_outlives_failures(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    counting = _CountingLedger()
    config = ServerConfig(request_purge_interval=3600.0)
    log = LimitLog(logging.getLogger("p2ppay.server"), clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_purging, counting, config, log)  # type: ignore[arg-type]
        await trio.sleep(3 * 3600 + 1)
        nursery.cancel_scope.cancel()
    assert counting.purges == 4  # at 0 s, 1 h (failed, logged), 2 h, 3 h
    assert "purging closed payment requests failed: the disk is full" in caplog.text


# -- 22.9: schema version 5 / 4, and its migration --


_NEW_INDEXES = {"movements_pair", "payment_requests_closed", "payment_requests_expires"}


def test_an_sqlite_ledger_of_version_4_gets_the_new_indexes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    connect_sqlite(path).close()
    db = sqlite3.connect(path)
    for index in _NEW_INDEXES:
        db.execute(f"DROP INDEX {index}")
    db.execute("PRAGMA user_version = 4")
    db.close()
    db = connect_sqlite(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == lg.SCHEMA_VERSION == 5
        found = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert found >= _NEW_INDEXES
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT 1 FROM movements WHERE payer = 'a' AND payee = 'b'"
            )
        )
        assert "movements_pair" in plan
    finally:
        db.close()


def test_a_postgresql_ledger_of_version_3_gets_the_new_indexes(postgres_url: str) -> None:
    connect_postgres(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        for index in _NEW_INDEXES:
            db.execute(f"DROP INDEX {index}")
        db.execute("UPDATE p2ppay_schema SET version = 3")
    connect_postgres(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT version FROM p2ppay_schema").fetchall() == [(4,)]
        assert lg.PG_SCHEMA_VERSION == 4
        found = {row[0] for row in db.execute("SELECT indexname FROM pg_indexes")}
        assert found >= _NEW_INDEXES


# -- 22.9: a real request cannot be hidden --


async def test_throwaway_accounts_cannot_hide_a_counterpartys_request(connect: Connect) -> None:
    async with connect() as alice, connect() as bob, connect() as carol:
        await registered(alice, "alice", deposit=100)
        await registered(bob, "bob")
        await registered(carol, "carol", deposit=100)
        await pay(alice, "bob", 5)  # alice has paid bob...
        await pay(carol, "alice", 5)  # ...and been paid by carol
        from_bob = await bob.request("alice", 42, "the real one")
        from_carol = await carol.request("alice", 7)
        flood = 0
        async with connect(ip="10.0.0.66") as mallory:
            for i in range(12):
                await registered(mallory, f"throwaway{i}")
                for _ in range(RequestLimitConfig().request_pair_burst):
                    await mallory.request("alice", 1)
                    flood += 1
                await mallory.logout()
        listed = await alice.requests()
        # The counterparties' requests first: one alice has paid, then one who paid alice;
        # then the newest rest.
        assert [r.request_id for r in listed.incoming[:2]] == [
            from_bob.request_id,
            from_carol.request_id,
        ]
        assert len(listed.incoming) == SHOWN
        assert {r.requester for r in listed.incoming[2:]} <= {f"throwaway{i}" for i in range(12)}
        assert (listed.incoming_total, listed.outgoing_total) == (flood + 2, 0)
        assert (await bob.requests()).outgoing_total == 1
        text = format_requests(listed)
        assert f"Asking you to pay ({SHOWN} of {flood + 2}):" in text
        assert text.splitlines()[-2] == f"  ...and {flood + 2 - SHOWN} more"
        assert text.splitlines()[-1] == "Your requests (0):"


async def test_accounts_that_paid_a_unit_cannot_hide_a_counterpartys_request(
    connect: Connect,
) -> None:
    """Review of 22.9: a dozen throwaway accounts that each pay the payer one unit become
    counterparties too, and their 5 requests each used to fill the list before an older real
    one. Now an account the payer has paid comes first whatever others paid, and among the
    rest each requester's newest request comes before anyone's second."""
    async with connect() as alice, connect() as bob, connect() as dave:
        await registered(alice, "alice", deposit=100)
        await registered(bob, "bob")
        await registered(dave, "dave", deposit=100)
        await pay(alice, "bob", 5)  # alice has paid bob
        await pay(dave, "alice", 5)  # dave has paid alice
        from_bob = await bob.request("alice", 42, "the real one")
        from_dave = await dave.request("alice", 7)
        async with connect(ip="10.0.0.66") as mallory:
            for i in range(12):
                await registered(mallory, f"throwaway{i}", deposit=1)
                await pay(mallory, "alice", 1)  # "a counterparty" for one unit
                for _ in range(RequestLimitConfig().request_pair_burst):
                    await mallory.request("alice", 1)
                await mallory.logout()
        listed = await alice.requests()
        assert listed.incoming_total is not None
        assert len(listed.incoming) == SHOWN < listed.incoming_total
        assert listed.incoming[0].request_id == from_bob.request_id
        # dave's one request is among the first requests of the 13 who paid alice
        assert from_dave.request_id in [r.request_id for r in listed.incoming[1:14]]
        firsts = listed.incoming[1:14]
        assert len({r.requester for r in firsts}) == 13


def test_the_totals_are_shown_only_when_some_are_not() -> None:
    def info(requester: str) -> p.RequestInfo:
        return p.RequestInfo(uuid.uuid4(), requester, "alice", 1, None, 0, 0, "open")

    text = format_requests(p.RequestsResult([info("bob")], [], 1, 0))
    assert text.splitlines()[0] == "Asking you to pay (1):" and "more" not in text
    text = format_requests(p.RequestsResult([info("bob")] * 100, [], 106, 0))
    assert text.splitlines()[0] == "Asking you to pay (100 of 106):"
    assert "  ...and 6 more" in text.splitlines()
    # a server from before the totals: as before
    assert format_requests(p.RequestsResult([info("bob")], [])).startswith("Asking you to pay (1):")


# -- 22.8: what the payee's terminal shows of a flood --


class _Screen:
    def __init__(self) -> None:
        self.written: list[str] = []

    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        raise EOFError

    def interrupt(self) -> None:
        pass

    def write(self, text: str) -> None:
        self.written.append(text)


@asynccontextmanager
async def _wallet(server_port: int, client_ctx: ssl.SSLContext) -> AsyncIterator[Wallet]:
    def connect() -> AbstractAsyncContextManager[Client]:
        return Client.connect(
            "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
        )

    async with Wallet.using(connect, policy=accept_all, listen_host="127.0.0.1") as wallet:
        yield wallet


def _requested(requester: str, state: str = "open") -> p.RequestInfo:
    return p.RequestInfo(uuid.uuid4(), requester, "alice", 1, None, 0, 0, state)


async def test_a_flood_of_requests_is_a_few_lines_on_the_payees_terminal(
    autojump_clock: trio.testing.MockClock, server_port: int, client_ctx: ssl.SSLContext
) -> None:
    screen = _Screen()
    async with _wallet(server_port, client_ctx) as wallet, trio.open_nursery() as nursery:
        terminal = Terminal(screen)
        nursery.start_soon(terminal.run)
        options = ClientOptions(host="127.0.0.1", port=1, cafile=Path("unused.pem"))
        shell = Shell(wallet, terminal, options, io.StringIO())
        nursery.start_soon(shell.show_events)
        send = wallet._event_send  # (what the server pushes arrives here)
        # 401 events from mallory: 200 requests, each cancelled, and one more request...
        for _ in range(200):
            made = _requested("mallory")
            await send.send(p.PaymentRequested(made))
            await send.send(p.RequestClosed(_requested("mallory", "cancelled")))
        await send.send(p.PaymentRequested(_requested("mallory")))
        # ...with a real request in the middle of it, which is shown whole.
        await send.send(p.PaymentRequested(_requested("bob")))
        await trio.testing.wait_all_tasks_blocked()
        shown = [line for line in screen.written if "mallory" in line]
        assert len(shown) == 2
        assert shown[0].startswith("mallory asks you to pay 1")
        assert shown[1].startswith("mallory cancelled the request")
        assert sum("bob asks you to pay 1" in line for line in screen.written) == 1
        await trio.sleep(BURST_QUIET)  # mallory's burst ends: one line sums up the rest
        await trio.testing.wait_all_tasks_blocked()
        mallory = [line for line in screen.written if "mallory" in line]
        assert len(mallory) == 3
        assert mallory[2].startswith("...and 399 more payment request events")
        # A later, separate request from mallory is shown again.
        await send.send(p.PaymentRequested(_requested("mallory")))
        await trio.testing.wait_all_tasks_blocked()
        assert len([line for line in screen.written if "mallory" in line]) == 4
        nursery.cancel_scope.cancel()


def test_a_burst_is_counted_per_requester_and_ends_after_a_quiet_spell() -> None:
    now = [0.0]
    bursts = RequestBurst(lambda: now[0])
    assert [bursts.note("mallory") for _ in range(4)] == [True, True, False, False]
    assert bursts.note("bob") is True
    assert bursts.due() == BURST_QUIET and bursts.summaries() == []
    now[0] = BURST_QUIET - 1
    assert bursts.note("mallory") is False  # still the same burst: the quiet restarts
    now[0] = BURST_QUIET
    assert bursts.summaries() == []  # bob's ended with nothing hidden; mallory's goes on
    assert bursts.due() == 2 * BURST_QUIET - 1
    now[0] = math.inf
    (line,) = bursts.summaries()
    assert line.startswith("...and 3 more payment request events") and "mallory" in line
    assert bursts.due() is None


def test_a_crowd_of_requesters_is_a_few_lines_in_all() -> None:
    """Review of 22.8: 22 throwaway accounts, 6 events each, within each one's allowance,
    gave the payee 67 lines (3 per account). A crowd now shows its first lines, then one."""
    now = [0.0]
    bursts = RequestBurst(lambda: now[0])
    shown = []
    for i in range(22):
        for _ in range(6):
            now[0] += 0.01
            shown += [f"event from m{i}"] if bursts.note(f"m{i}") else []
            shown += bursts.summaries()
    now[0] += BURST_QUIET
    shown += bursts.summaries()
    assert len(shown) <= SHOWN_PER_CROWD + 1, shown
    assert shown[-1].startswith("...and ") and "from 22 accounts" in shown[-1]
    hidden = int(shown[-1].split()[1]) + sum(
        int(line.split()[1]) for line in shown[:-1] if line.startswith("...and ")
    )
    assert hidden + sum(1 for line in shown if line.startswith("event")) == 22 * 6
    assert bursts.due() is None
    # the crowd over, a real requester's line is shown again
    now[0] += BURST_QUIET
    assert bursts.note("alice") is True
