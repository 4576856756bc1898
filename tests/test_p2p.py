"""Peer-to-peer payments: one real server and several wallets on loopback, in one trio run."""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.client.connection import Client
from p2ppay.client.outcomes import Outcome
from p2ppay.client.peer import Dialer, OfferListener, PeerConfig, accept_all, decline_all
from p2ppay.client.wallet import (
    CannotConnect,
    Disconnected,
    NotSettledNews,
    OfferAnswered,
    PaymentFailed,
    Wallet,
)
from p2ppay.ledger import SqliteLedger

from .conftest import PASSWORD, Open, SettleCutter


async def next_of(wallet: Wallet, kind: type[Any]) -> Any:
    """The wallet's next event of ``kind`` (others are skipped)."""
    with trio.fail_after(10):
        async for event in wallet.events:
            if isinstance(event, kind):
                return event
    raise AssertionError("the wallet's events ended")


def keeping(
    server_port: int, client_ctx: ssl.SSLContext, clients: list[Client]
) -> Callable[[], AbstractAsyncContextManager[Client]]:
    """A wallet's way to the server that keeps each client it opens in ``clients`` (so that a
    test can cut the connection)."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Client]:
        async with Client.connect(
            "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
        ) as client:
            clients.append(client)
            yield client

    return connect


@asynccontextmanager
async def offline_bob(
    server_port: int, client_ctx: ssl.SSLContext, clients: list[Client], **kw: Any
) -> AsyncIterator[Wallet]:
    """bob's wallet, registered and logged in, whose lost server connection is tried again
    only after a minute."""
    kw.setdefault("policy", accept_all)
    async with Wallet.using(
        keeping(server_port, client_ctx, clients),
        listen_host="127.0.0.1",
        reconnect_delays=(60, 60),
        **kw,
    ) as bob:
        await bob.register("bob", PASSWORD)
        await bob.login("bob", PASSWORD)
        yield bob


def hold_after(
    monkeypatch: pytest.MonkeyPatch, owner: type[Any], method: str
) -> tuple[trio.Event, trio.Event]:
    """Patch ``owner.method`` so that, once it has done its work, it sets the first event and
    returns only when the second is set."""
    reached, go_on = trio.Event(), trio.Event()
    real = getattr(owner, method)

    async def held(self: Any, *args: Any) -> Any:
        result = await real(self, *args)
        reached.set()
        await go_on.wait()
        return result

    monkeypatch.setattr(owner, method, held)
    return reached, go_on


async def expect_failure(code: str, wallet: Wallet, payee: str, amount: Any) -> PaymentFailed:
    with pytest.raises(PaymentFailed) as info:
        await wallet.pay(payee, amount)
    assert info.value.code == code, info.value
    return info.value


async def test_accepted_payment(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=500) as alice, open_wallet("bob") as bob:
            result = await alice.pay("bob", 300)
            assert (result.payer, result.payee, result.amount, result.balance) == (
                "alice",
                "bob",
                300,
                200,
            )
            answered = await next_of(bob, OfferAnswered)
            assert answered.accepted and answered.offer.payment_id == result.payment_id
            received = await next_of(bob, p.PaymentReceived)
            assert received == p.PaymentReceived(result.payment_id, "alice", 300, 300)
            assert await bob.balance() == 300
            assert await alice.balance() == 200
            history = await alice.history()
            assert history[0].kind == "sent" and history[0].counterparty == "bob"


async def test_declined_payment_moves_nothing(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=500) as alice,
            open_wallet("carol", policy=decline_all) as carol,
        ):
            failure = await expect_failure("declined", alice, "carol", 50)
            assert "carol declined" in failure.message
            assert await alice.balance() == 500
            assert await carol.balance() == 0


async def test_payee_that_never_answers_times_out(open_wallet: Open) -> None:
    async def ponder_forever(offer: p.Offer) -> bool:
        await trio.sleep_forever()
        raise AssertionError

    impatient = PeerConfig(answer_timeout=0.5)
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=500, peer_config=impatient) as alice,
            open_wallet("bob", policy=ponder_forever),
        ):
            await expect_failure("timed_out", alice, "bob", 10)
            assert await alice.balance() == 500


async def test_payee_who_does_not_decide_in_time_declines(open_wallet: Open) -> None:
    async def ponder_forever(offer: p.Offer) -> bool:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=500) as alice,
            open_wallet("bob", policy=ponder_forever, peer_config=PeerConfig(decide_timeout=0.2)),
        ):
            failure = await expect_failure("declined", alice, "bob", 10)
            assert "no answer in time" in failure.message


async def test_payee_offline_unknown_self_and_bad_amounts(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with open_wallet("dave"):
                pass  # registered, then gone
            await expect_failure("payee_offline", alice, "dave", 10)
            await expect_failure("unknown_user", alice, "nobody", 10)
            await expect_failure("self_payment", alice, "alice", 10)
            for amount in (0, -5, 2.5, "10", True):
                await expect_failure("bad_amount", alice, "dave", amount)
            async with open_wallet("bob") as bob:
                failure = await expect_failure("insufficient_funds", alice, "bob", 101)
                assert failure.message == "your balance 100 is less than 101"
                assert bob.listener is not None
                assert bob.listener.connections_accepted == 0  # bob was not even asked
                # Over the server's per-payment limit too, but alice's own balance says no
                # first, without asking bob (the server's bad_amount is tested in test_session).
                await expect_failure("insufficient_funds", alice, "bob", 10_000_000)
                assert bob.listener.connections_accepted == 0
                assert await bob.balance() == 0
            assert await alice.balance() == 100


async def test_two_payers_one_payee_concurrently(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100) as alice,
            open_wallet("carol", deposit=100) as carol,
            open_wallet("bob") as bob,
        ):
            results: list[p.SettleResult] = []

            async def pay(wallet: Wallet, amount: int) -> None:
                results.append(await wallet.pay("bob", amount))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pay, alice, 40)
                nursery.start_soon(pay, carol, 25)
            assert sorted((r.payer, r.amount) for r in results) == [("alice", 40), ("carol", 25)]
            events = [await next_of(bob, p.PaymentReceived) for _ in range(2)]
            assert sorted(e.payer for e in events) == ["alice", "carol"]
            assert await bob.balance() == 65
            assert bob.listener is not None and bob.listener.connections_accepted == 2


async def test_paying_twice_reuses_one_connection(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            first = await alice.pay("bob", 10)
            second = await alice.pay("bob", 15)
            assert first.payment_id != second.payment_id
            assert second.balance == 75
            assert bob.listener is not None and bob.listener.connections_accepted == 1
            assert alice.dialer is not None and alice.dialer.links["bob"].offers_sent == 2
            assert await bob.balance() == 25


async def test_settle_retried_after_the_server_connection_is_cut(
    open_wallet: Open, server_port: int, client_ctx: ssl.SSLContext, ledger: SqliteLedger
) -> None:
    streams: list[SettleCutter] = []

    @asynccontextmanager
    async def cuttable_connect() -> AsyncIterator[Client]:
        tcp = await trio.open_tcp_stream("127.0.0.1", server_port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname="localhost")
        await tls.do_handshake()
        stream = SettleCutter(tls, after=True)
        streams.append(stream)
        async with Client.over(stream, request_timeout=math.inf) as client:
            yield client

    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100, connect=cuttable_connect) as alice,
            open_wallet("bob") as bob,
        ):
            streams[-1].armed = True
            result = await alice.pay("bob", 30)
            assert len(streams) == 2  # the settle went out, the line was cut, then a retry
            assert (result.payee, result.amount, result.balance) == ("bob", 30, 70)
            received = await next_of(bob, p.PaymentReceived)
            assert received.payment_id == result.payment_id
            assert await bob.balance() == 30
            assert await alice.balance() == 70
    audit = await ledger.audit()
    assert audit.transfers == 1 and audit.conserved


async def test_an_open_link_spares_the_lookup_until_it_breaks(
    open_wallet: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    lookup = Client.lookup

    async def counted(self: Client, name: str) -> p.Presence:
        lookups.append(name)
        return await lookup(self, name)

    monkeypatch.setattr(Client, "lookup", counted)
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with open_wallet("bob") as bob:
                await alice.pay("bob", 10)
                await alice.pay("BOB", 10)  # on the open link: the server is not asked
                assert lookups == ["bob"]
                assert bob.listener is not None and bob.listener.connections_accepted == 1
                # bob logs in again elsewhere: his first wallet stops taking offers, so the
                # link breaks, and alice's next payment asks the server where he is now
                async with open_wallet("bob", register=False) as bob_again:
                    assert (await alice.pay("bob", 5)).balance == 75
                    assert lookups == ["bob", "bob"]
                    assert bob_again.listener is not None
                    assert bob_again.listener.connections_accepted == 1
            # bob logged out: his client closed the link, and the server says he is offline
            await trio.testing.wait_all_tasks_blocked()
            offered: list[p.Offer] = []
            with pytest.raises(PaymentFailed) as info:
                await alice.pay("bob", 10, on_offer=offered.append)
            assert info.value.code == "payee_offline" and offered == []
            assert lookups == ["bob", "bob", "bob"]
            assert alice.dialer is not None and "bob" not in alice.dialer.links
            assert await alice.balance() == 75


async def test_a_payee_who_lost_the_server_is_not_paid_on_an_old_link(
    server_port: int, client_ctx: ssl.SSLContext, open_wallet: Open
) -> None:
    # The server cannot tell an offline payee of a payment: while bob's client has lost the
    # server it closes its payers' links, and alice hears from the server that he is offline.
    clients: list[Client] = []
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with offline_bob(server_port, client_ctx, clients) as bob:
                await alice.pay("bob", 10)
                assert bob.listener is not None and bob.listener.connections_accepted == 1
                # bob's server connection drops (he tries again in a minute)
                await trio.aclose_forcefully(clients[-1].stream)
                await next_of(bob, Disconnected)
                await trio.testing.wait_all_tasks_blocked()
                offered: list[p.Offer] = []
                with pytest.raises(PaymentFailed) as info:
                    await alice.pay("bob", 20, on_offer=offered.append)
                assert info.value.code == "payee_offline" and offered == []
                assert bob.listener.connections_accepted == 1  # not asked again
            assert await alice.balance() == 90


async def test_a_payee_offline_takes_no_new_payer_either(
    server_port: int, client_ctx: ssl.SSLContext, open_wallet: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    # alice's lookup answers just before bob loses the server; her connection comes after.
    looked, go_on = hold_after(monkeypatch, Client, "lookup")
    clients: list[Client] = []
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with offline_bob(server_port, client_ctx, clients) as bob:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(expect_failure, "unreachable", alice, "bob", 10)
                    await looked.wait()
                    await trio.aclose_forcefully(clients[-1].stream)
                    await next_of(bob, Disconnected)
                    await trio.testing.wait_all_tasks_blocked()
                    go_on.set()
                assert alice.dialer is not None and "bob" not in alice.dialer.links
                await expect_failure("payee_offline", alice, "bob", 10)
            assert await alice.balance() == 100


async def test_an_offer_on_a_link_that_breaks_while_the_payee_decides_asks_the_server(
    server_port: int, client_ctx: ssl.SSLContext, open_wallet: Open
) -> None:
    asked: list[p.Offer] = []
    deciding = trio.Event()

    async def slow(offer: p.Offer) -> bool:
        asked.append(offer)
        if len(asked) == 2:
            deciding.set()
            await trio.sleep_forever()
        return True

    clients: list[Client] = []
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with offline_bob(server_port, client_ctx, clients, policy=slow):
                await alice.pay("bob", 10)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(expect_failure, "payee_offline", alice, "bob", 20)
                    await deciding.wait()
                    await trio.aclose_forcefully(clients[-1].stream)  # bob loses the server
                assert len(asked) == 2
            assert await alice.balance() == 90


async def test_an_offer_waiting_for_a_busy_link_is_not_announced_if_the_link_closes(
    open_wallet: Open,
) -> None:
    asked, release = trio.Event(), trio.Event()
    decided: list[p.Offer] = []

    async def policy(offer: p.Offer) -> bool:
        decided.append(offer)
        if len(decided) == 2:
            asked.set()
            await release.wait()
        return True

    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with open_wallet("bob", policy=policy) as bob:
                await alice.pay("bob", 10)
                failures: list[PaymentFailed] = []
                offered: list[p.Offer] = []

                async def pay(on_offer: Callable[[p.Offer], None] | None = None) -> None:
                    with pytest.raises(PaymentFailed) as info:
                        await alice.pay("bob", 5, on_offer=on_offer)
                    failures.append(info.value)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pay)
                    await asked.wait()  # the first offer is out: the link is busy
                    nursery.start_soon(pay, offered.append)
                    await trio.testing.wait_all_tasks_blocked()
                    await bob.logout()
                # (unreachable or payee_offline, by whether the server has heard of the
                # logout when the payer asks it: the client stops listening first)
                assert {f.code for f in failures} <= {"unreachable", "payee_offline"}
                assert len(failures) == 2 and len(decided) == 2
                assert offered == []  # the second offer never went out, nor was announced
            assert await alice.balance() == 90


async def test_a_payer_who_logs_out_during_the_handshake_offers_nothing(
    open_wallet: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    shaken, go_on = hold_after(monkeypatch, Dialer, "_connect")
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            dialer = alice.dialer
            assert dialer is not None and bob.listener is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_failure, "not_logged_in", alice, "bob", 20)
                await shaken.wait()
                await alice.logout()
                go_on.set()
            assert not dialer.links
            await trio.testing.wait_all_tasks_blocked()
            assert bob.listener.connections_open == 0  # the link was closed, bob never asked


async def test_a_payer_without_the_server_asks_no_payee(
    server_port: int, client_ctx: ssl.SSLContext, open_wallet: Open
) -> None:
    # alice cannot settle without the server: her open link to bob must not ask him.
    asked: list[p.Offer] = []

    async def policy(offer: p.Offer) -> bool:
        asked.append(offer)
        return True

    clients: list[Client] = []
    keep = keeping(server_port, client_ctx, clients)
    down = False

    @asynccontextmanager
    async def connect() -> AsyncIterator[Client]:
        if down:
            raise OSError("connection refused")
        async with keep() as client:
            yield client

    with trio.fail_after(30):
        async with (
            open_wallet("bob", policy=policy),
            Wallet.using(connect, listen_host="127.0.0.1", reconnect_delays=(60, 60)) as alice,
        ):
            await alice.register("alice", PASSWORD)
            await alice.login("alice", PASSWORD)
            await alice.deposit(100)
            await alice.pay("bob", 10)
            down = True
            await trio.aclose_forcefully(clients[-1].stream)
            await next_of(alice, Disconnected)
            with pytest.raises(CannotConnect):
                await alice.pay("bob", 20)
            assert len(asked) == 1


async def test_a_handshake_done_as_the_payee_goes_offline_is_not_served(
    open_wallet: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The payee's client loses the server just as a payer's handshake completes.
    listeners: list[OfferListener] = []
    handshake = trio.SSLStream.do_handshake

    async def then_offline(self: trio.SSLStream[Any]) -> None:
        await handshake(self)
        if self.server_side and listeners:
            listeners[0].go_offline()

    monkeypatch.setattr(trio.SSLStream, "do_handshake", then_offline)
    asked: list[p.Offer] = []

    async def policy(offer: p.Offer) -> bool:
        asked.append(offer)
        return True

    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice:
            async with open_wallet("bob", policy=policy) as bob:
                assert bob.listener is not None
                listeners.append(bob.listener)
                await expect_failure("unreachable", alice, "bob", 10)
                assert asked == []
            assert await alice.balance() == 100


async def test_a_payer_who_logs_out_during_the_lookup_offers_nothing(
    open_wallet: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked, go_on = hold_after(monkeypatch, Client, "lookup")
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            dialer = alice.dialer
            assert dialer is not None and bob.listener is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_failure, "not_logged_in", alice, "bob", 20)
                await looked.wait()
                await alice.logout()
                go_on.set()
            assert bob.listener.connections_accepted == 0  # bob was never asked
            assert not dialer.links


async def test_a_link_to_a_replaced_login_is_dropped_when_its_acceptance_fails(
    open_wallet: Open,
) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            await alice.pay("bob", 10)
            # A login of bob's that has not yet heard it was replaced: it still answers on
            # alice's link, signing with a key the server no longer has for bob (and does not
            # log in again by itself).
            assert bob.listener is not None
            bob._forget_login = lambda: None  # type: ignore[method-assign]
            bob.listener.go_offline = lambda: None  # type: ignore[method-assign]
            bob._closing = True
            async with open_wallet("bob", register=False) as bob_again:
                await expect_failure("bad_acceptance", alice, "bob", 20)
                assert alice.dialer is not None and "bob" not in alice.dialer.links
                assert (await alice.pay("bob", 20)).balance == 70  # asks the server: bob_again
                assert bob_again.listener is not None
                assert bob_again.listener.connections_accepted == 1
                assert await bob_again.balance() == 30


async def test_listener_refuses_misaddressed_and_malformed_offers(open_wallet: Open) -> None:
    import uuid

    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            assert alice.identity is not None and bob.p2p_port is not None
            tcp = await trio.open_tcp_stream("127.0.0.1", bob.p2p_port)
            stream = trio.SSLStream(tcp, alice.identity.dialer_context)
            lines = p.LineBuffer()

            async def exchange(data: bytes) -> p.PeerMessage | None:
                await stream.send_all(data)
                while (line := lines.next_line()) is None:
                    try:
                        chunk = await stream.receive_some()
                    except trio.BrokenResourceError:
                        return None  # closed (reset) by the payee
                    if not chunk:
                        return None  # closed by the payee
                    lines.feed(chunk)
                return p.decode_peer_message(line)

            pid = uuid.uuid4()
            for offer, reason in [
                (p.Offer(pid, "alice", "carol", 5), "this is bob, not carol"),
                (p.Offer(pid, "mallory", "bob", 5), "your certificate names alice, not mallory"),
            ]:
                answer = await exchange(p.encode_peer_message(offer))
                assert answer == p.Decline(pid, reason)
            answer = await exchange(b'{"type": "offer", "amount": "lots"}\n')
            assert isinstance(answer, p.Decline) and answer.payment_id is None
            assert await exchange(b"more\n") is None  # and then the payee closed the line
            await trio.aclose_forcefully(stream)
            # bob's wallet is unharmed and still takes a proper payment.
            assert (await alice.pay("bob", 5)).balance == 95


async def test_payee_online_but_unreachable(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            bob.stop_listening()  # bob's offer listener is gone; his session is not
            await trio.testing.wait_all_tasks_blocked()
            failure = await expect_failure("unreachable", alice, "bob", 10)
            assert "cannot reach bob" in failure.message
            assert await alice.balance() == 100


async def test_payee_is_told_when_an_accepted_offer_is_not_settled(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            alice.known_balance = None  # as if alice had not seen her balance yet
            await expect_failure("insufficient_funds", alice, "bob", 150)
            answered = await next_of(bob, OfferAnswered)
            assert answered.accepted and answered.offer.amount == 150
            news = await next_of(bob, NotSettledNews)
            assert news.payer == "alice"
            assert news.news.payment_id == answered.offer.payment_id
            assert "less than 150" in news.news.reason
            assert await bob.balance() == 0
            # the link stays usable for the next offer
            assert (await alice.pay("bob", 30)).balance == 70


async def test_names_in_any_letter_case_reach_the_same_payee(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("Bob") as bob:
            result = await alice.pay("bOB", 30)
            assert (result.payee, result.balance) == ("Bob", 70)
            received = await next_of(bob, p.PaymentReceived)
            assert (received.payment_id, received.payer) == (result.payment_id, "alice")
            await expect_failure("self_payment", alice, "ALICE", 1)
            assert bob.listener is not None and bob.listener.connections_accepted == 1
            # Logging in as "bob" is logging in to Bob's account, named as registered.
            async with open_wallet("bob", register=False) as again:
                assert again.user == "Bob"
                assert (await alice.pay("BOB", 5)).balance == 65
                assert await again.balance() == 35


def test_the_readme_lists_every_outcome_of_a_payment() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("A payment ends in one of these outcomes", 1)[1].split("\n\n")[1]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(listed) == sorted(o.value for o in Outcome)
    assert len(listed) == len(set(listed))
