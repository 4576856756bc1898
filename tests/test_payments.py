"""Issue 13 in the server session and the ledger (in memory, fast): memos covered by the v2
acceptance, payment requests and their events and limits, idempotent deposits, passwd."""

from __future__ import annotations

import base64
import io
import json
import math
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.cli.shell import Shell
from p2ppay.cli.terminal import Terminal
from p2ppay.client.connection import Client
from p2ppay.ledger import SqliteLedger
from p2ppay.pki import sign_acceptance, sign_acceptance_v1
from p2ppay.server import ServerConfig
from p2ppay.wire.constraints import is_memo, parse_duration

from .conftest import (
    FAST_SCRYPT,
    KEYS,
    Connect,
    Open,
    SettleCutter,
    expect_error,
    login,
    next_event,
    registered,
)
from .test_shell import Typist, options


def signed(payee: str, pid: uuid.UUID, payer: str, amount: int, memo: str | None) -> str:
    key = KEYS[payee].key
    return base64.b64encode(sign_acceptance(key, str(pid), payer, payee, amount, memo)).decode()


async def test_the_acceptance_covers_the_memo(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            # Signed over one memo, settled with another (or none, or one added): refused.
            pid = uuid.uuid4()
            good = signed("bob", pid, "alice", 5, "lunch")
            for memo in ("lunch!", None):
                await expect_error("bad_acceptance", alice.settle(pid, "bob", 5, good, memo))
            bare = signed("bob", pid, "alice", 5, None)
            await expect_error("bad_acceptance", alice.settle(pid, "bob", 5, bare, "lunch"))
            paid = await alice.settle(pid, "bob", 5, good, "lunch")
            assert paid.memo == "lunch"
            event = await next_event(bob)
            assert isinstance(event, p.PaymentReceived) and event.memo == "lunch"
            # The same payment id with another memo is another payment.
            other = signed("bob", pid, "alice", 5, "dinner")
            await expect_error("payment_id_conflict", alice.settle(pid, "bob", 5, other, "dinner"))
            # A memo the server refuses: control characters.
            pid2 = uuid.uuid4()
            bad = "a\nb"
            sig = signed("bob", pid2, "alice", 5, bad)
            await expect_error("bad_request", alice.settle(pid2, "bob", 5, sig, bad))
            # The first acceptance format (no memo) still settles a payment without a memo,
            # and never one with a memo.
            pid3 = uuid.uuid4()
            v1 = sign_acceptance_v1(KEYS["bob"].key, str(pid3), "alice", "bob", 7)
            v1_text = base64.b64encode(v1).decode()
            await expect_error("bad_acceptance", alice.settle(pid3, "bob", 7, v1_text, "memo"))
            assert (await alice.settle(pid3, "bob", 7, v1_text)).amount == 7
            history = await bob.history(5)
            assert [(e.amount, e.memo) for e in history] == [(7, None), (5, "lunch")]


async def test_requests_tell_both_sides_while_online(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            made = await bob.request("ALICE", 30, "rent", 600)
            assert (made.requester, made.payer, made.state) == ("bob", "alice", "open")
            assert abs(made.expires_ms - made.created_ms - 600_000) < 5_000
            asked = await next_event(alice)
            assert asked == p.PaymentRequested(made)
            listed = await alice.requests()
            assert listed.incoming == [made] and listed.outgoing == []
            assert (await bob.requests()).outgoing == [made]
            # Only the payer may pay or decline it, only the requester cancel it.
            await expect_error("unknown_request", bob.pay_request(made.request_id))
            await expect_error("unknown_request", bob.decline_request(made.request_id))
            await expect_error("unknown_request", alice.cancel_request(made.request_id))
            paid = await alice.pay_request(made.request_id)
            assert (paid.payment_id, paid.payee, paid.amount, paid.memo, paid.balance) == (
                made.request_id,
                "bob",
                30,
                "rent",
                70,
            )
            # Two events, each sent on its own (in either order).
            two = [await next_event(bob), await next_event(bob)]
            received = next(e for e in two if isinstance(e, p.PaymentReceived))
            assert received.memo == "rent" and received.payment_id == made.request_id
            closed = next(e for e in two if isinstance(e, p.RequestClosed))
            assert closed.request.state == "paid" and closed.request.request_id == made.request_id
            await expect_error("request_paid", alice.decline_request(made.request_id))
            # Told live: the next login has no news of it.
            await bob.logout()
            assert (await login(bob, "bob")).request_news == []

            second = await bob.request("alice", 1)
            await next_event(alice)
            await alice.decline_request(second.request_id)
            declined = await next_event(bob)
            assert isinstance(declined, p.RequestClosed) and declined.request.state == "declined"
            third = await bob.request("alice", 2)
            await next_event(alice)
            await bob.cancel_request(third.request_id)
            cancelled = await next_event(alice)
            assert isinstance(cancelled, p.RequestClosed)
            assert cancelled.request.state == "cancelled"
            # Nobody can ask themselves, or someone who does not exist, or for too long.
            await expect_error("self_payment", bob.request("bob", 1))
            await expect_error("unknown_user", bob.request("nobody", 1))
            await expect_error("bad_request", bob.request("alice", 1, None, 31 * 86400))
            await expect_error("bad_request", bob.request("alice", 1, "\x1b[31m"))


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(scrypt=FAST_SCRYPT, max_open_requests=3, max_requests_per_payer=2)


async def test_open_requests_are_limited_per_requester(connect: Connect) -> None:
    with trio.fail_after(10):
        async with (
            connect("10.0.0.1") as a,
            connect("10.0.0.2") as b,
            connect("10.0.0.3") as c,
            connect("10.0.0.4") as d,
        ):
            for client, name in ((a, "alice"), (b, "bob"), (c, "carol"), (d, "dave")):
                await registered(client, name)
            first = await b.request("alice", 1)
            await b.request("alice", 2)
            await expect_error("too_many_requests", b.request("alice", 3))  # 2 to alice
            await b.request("carol", 3)
            await expect_error("too_many_requests", b.request("dave", 3))  # bob made 3
            # bob's flood does not stop anyone else from asking alice for money.
            await c.request("alice", 3)
            await d.request("alice", 4)
            await b.cancel_request(first.request_id)
            await b.request("alice", 5)  # room again


async def test_deposit_ids_and_passwd(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice:
            await registered(alice, "alice")
            did = uuid.uuid4()
            assert await alice.deposit(10, did) == 10
            assert await alice.deposit(5) == 15
            assert await alice.deposit(10, did) == 10  # the first outcome, again
            assert (await alice.list()).balance == 15
            await expect_error("deposit_id_conflict", alice.deposit(11, did))
            await expect_error("auth_failed", alice.passwd("wrong password", "new password"))
            await expect_error("bad_request", alice.passwd("correct horse", "short"))
            await alice.passwd("correct horse", "new password")
        async with connect("10.0.0.1") as again:
            await expect_error("auth_failed", login(again, "alice", "correct horse"))
            await login(again, "alice", "new password")


async def test_a_request_is_paid_once_however_many_times_it_is_asked(
    ledger: SqliteLedger,
) -> None:
    await ledger.create_account("alice", None)
    await ledger.create_account("bob", None)
    await ledger.deposit("alice", 100)
    rid = uuid.uuid4()
    far = 2**52
    await ledger.create_request(rid, "bob", "alice", 30, "x", far, 10, 10)
    outcomes: list[lg.Transfer] = []

    async def pay() -> None:
        transfer, _ = await ledger.pay_request(rid, "alice")
        outcomes.append(transfer)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(pay)
    assert sum(not t.replayed for t in outcomes) == 1 and len(outcomes) == 20
    audit = await ledger.audit()
    assert audit.conserved and audit.transfers == 1
    assert (await ledger.account("bob")).balance == 30  # type: ignore[union-attr]
    # Its news is told once.
    news = await ledger.request_news("bob")
    assert [(r.request_id, r.state) for r in news] == [(rid, "paid")]
    assert await ledger.request_news("bob") == []
    # An expired request cannot be paid; a declined one neither.
    old = uuid.uuid4()
    await ledger.create_request(old, "bob", "alice", 1, None, 1, 10, 10)
    with pytest.raises(lg.RequestExpired):
        await ledger.pay_request(old, "alice")
    no = uuid.uuid4()
    await ledger.create_request(no, "bob", "alice", 1, None, far, 10, 10)
    await ledger.close_request(no, "alice", "declined")
    with pytest.raises(lg.RequestDeclined):
        await ledger.pay_request(no, "alice")


def test_memos_and_durations() -> None:
    assert is_memo("lunch at noon, 🍜") and is_memo("x" * 140)
    for bad in ("", "x" * 141, "a\nb", "\x1b[2J", "a\u202eb", "\ud800", 5):
        assert not is_memo(bad), bad
    assert [parse_duration(t) for t in ("10m", "2h", "30s", "7d", "1H")] == [
        600,
        7200,
        30,
        604800,
        3600,
    ]
    for bad in ("", "10", "m", "0s", "-1h", "1.5h", "1e3s", "\uff11h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


@pytest.mark.parametrize("op", ["deposit", "pay_request"])
async def test_a_lost_reply_is_retried_with_the_same_id(
    open_wallet: Open,
    server_port: int,
    client_ctx: ssl.SSLContext,
    ledger: SqliteLedger,
    op: str,
) -> None:
    streams: list[SettleCutter] = []

    @asynccontextmanager
    async def cuttable_connect() -> AsyncIterator[Client]:
        tcp = await trio.open_tcp_stream("127.0.0.1", server_port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname="localhost")
        await tls.do_handshake()
        stream = SettleCutter(tls, after=True, op=op)
        streams.append(stream)
        async with Client.over(stream, request_timeout=math.inf) as client:
            yield client

    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100, connect=cuttable_connect) as alice,
            open_wallet("bob") as bob,
        ):
            streams[-1].armed = True
            if op == "deposit":
                assert await alice.deposit(50) == 150  # done, reply lost, retried: once
            else:
                made = await bob.request("alice", 30, "rent")
                paid = await alice.pay_request(made.request_id)
                assert (paid.payment_id, paid.balance) == (made.request_id, 70)
            assert len(streams) == 2  # the request went out, the line was cut, then a retry
            assert await alice.balance() == (150 if op == "deposit" else 70)
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == (150 if op == "deposit" else 100)


REQUEST = p.RequestInfo(
    uuid.UUID("00000000-0000-0000-0000-000000000009"),
    "bob",
    "alice",
    30,
    "rent\x1b[2J",  # (the server refuses such a memo; shown escaped all the same)
    0,
    1_700_000_000_000,
    "open",
)


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (p.PaymentRequested(REQUEST), 'bob asks you to pay 30 for "rent\\x1b[2J" by '),
        (
            p.RequestClosed(msgspec.structs.replace(REQUEST, state="paid", memo=None)),
            "alice paid your request 00000000-0000-0000-0000-000000000009 for 30.",
        ),
        (
            p.RequestClosed(msgspec.structs.replace(REQUEST, state="declined", memo="x")),
            'alice declined your request 00000000-0000-0000-0000-000000000009 for 30 for "x".',
        ),
        (
            p.PaymentReceived(REQUEST.request_id, "alice", 30, 30, "lunch"),
            'alice paid you 30 for "lunch" (payment 00000000-0000-0000-0000-000000000009).',
        ),
    ],
)
async def test_how_request_events_and_memos_are_shown(
    open_wallet: Open, event: p.Event, text: str
) -> None:
    with trio.fail_after(10):
        async with open_wallet("zed") as wallet:
            human, machine = Typist(), Typist()
            Shell(wallet, Terminal(human), options(), io.StringIO()).show_event(event)
            Shell(wallet, Terminal(machine), options(json=True), io.StringIO()).show_event(event)
    assert len(human.written) == 1 and human.written[0].startswith(text), human.written
    assert "\x1b" not in human.written[0]
    assert [json.loads(line) for line in machine.written] == [msgspec.to_builtins(event)]
