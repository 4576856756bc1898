"""Error paths of the wallet and of the peer-to-peer leg: settling when the server cannot be
reached, a failed login, the payee's connection cap and handshake deadline, a broken link."""

from __future__ import annotations

import errno
import logging
import math
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

from p2ppay import wire as p
from p2ppay.client.connection import Client, ServerError
from p2ppay.client.outcomes import Outcome
from p2ppay.client.peer import OfferListener, PeerConfig, PeerIdentity, PeerKey, accept_all
from p2ppay.client.wallet import CannotConnect, OfferAnswered, PaymentFailed, Wallet
from p2ppay.ledger import SqliteLedger
from p2ppay.server import Server

from .conftest import PASSWORD, Connect, Open, SettleCutter, closed_by_peer
from .test_p2p import expect_failure, next_of


async def test_settling_gives_up_when_the_server_stays_unreachable(
    open_wallet: Open, server_port: int, client_ctx: ssl.SSLContext, ledger: SqliteLedger
) -> None:
    streams: list[SettleCutter] = []
    attempts: list[str] = []
    server_down = False

    @asynccontextmanager
    async def connect() -> AsyncIterator[Client]:
        if server_down:
            attempts.append("refused")
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        tcp = await trio.open_tcp_stream("127.0.0.1", server_port)
        tls = trio.SSLStream(tcp, client_ctx, server_hostname="localhost")
        await tls.do_handshake()
        stream = SettleCutter(tls, after=False)
        streams.append(stream)
        async with Client.over(stream, request_timeout=math.inf) as client:
            yield client

    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100, connect=connect) as alice,
            open_wallet("bob") as bob,
        ):
            streams[-1].armed = True

            def server_goes_down(offer: p.Offer) -> None:
                nonlocal server_down
                server_down = True

            payment_id = uuid.uuid4()
            with pytest.raises(PaymentFailed) as info:
                await alice.pay("bob", 30, payment_id, on_offer=server_goes_down)
            failure = info.value
            assert failure.code is Outcome.SERVER_UNREACHABLE
            assert failure.message == (
                f"could not reach the server to settle {payment_id}; retry with the same payment id"
            )
            # The first try, then three reconnections (and the wallet's own, in the background).
            assert len(attempts) >= 3
            answered = await next_of(bob, OfferAnswered)
            assert answered.accepted and answered.offer.payment_id == payment_id
            # bob accepted; nothing moved.
            audit = await ledger.audit()
            assert audit.transfers == 0
            # The server is back: the retry with the same payment id settles, once.
            server_down = False
            result = await alice.pay("bob", 30, payment_id)
            assert (result.payment_id, result.balance) == (payment_id, 70)
            assert (await ledger.audit()).transfers == 1


async def test_a_failed_login_closes_its_offer_listeners(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice") as alice, open_wallet("bob", register=True) as bob:
            await bob.logout()
            probe = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            port = probe.socket.getsockname()[1]
            await probe.aclose()
            with pytest.raises(ServerError) as info:
                await bob.login("bob", "wrong password", listen_port=port)
            assert info.value.code == "auth_failed"
            assert bob.user is None and bob.listener is None and bob.p2p_port is None
            # The port is free again: someone else may listen on it, and bob may log in on it.
            again = await trio.open_tcp_listeners(port, host="127.0.0.1")
            await again[0].aclose()
            await bob.login("bob", PASSWORD, listen_port=port)
            assert bob.p2p_port == port
            assert (await alice.list()).online[1] == p.Presence("bob", "127.0.0.1", port)


# --- the payee's listener, in memory ------------------------------------------------------------


async def identity_of(connect: Connect, name: str) -> PeerIdentity:
    """Register ``name`` on the in-memory server and build its peer identity."""
    async with connect(request_timeout=math.inf) as client:
        await client.register(name, PASSWORD)
        key = PeerKey()
        result = await client.login(name, PASSWORD, 9000, key.csr(name))
    assert result.certificate is not None and result.peer_ca is not None
    return await trio.to_thread.run_sync(
        PeerIdentity.build, name, key, result.certificate, result.peer_ca
    )


async def test_one_payer_has_at_most_so_many_connections_to_a_payee(
    connect: Connect, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await identity_of(connect, "bob")
    mallory = await identity_of(connect, "mallory")
    listener = OfferListener(bob, accept_all, PeerConfig(max_connections_per_payer=2))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            links = []
            for _ in range(3):
                payer_side, payee_side = trio.testing.memory_stream_pair()
                nursery.start_soon(listener.handle, payee_side)
                tls = trio.SSLStream(payer_side, mallory.dialer_context, server_hostname="bob")
                await tls.do_handshake()
                links.append(tls)
            await trio.testing.wait_all_tasks_blocked()
            # The third, past mallory's two, is closed once her certificate says it is her.
            assert await closed_by_peer(links[2], within=1)
            assert not await closed_by_peer(links[0], within=0.1)
            assert "limit payer-connections-per-payer: mallory has enough open" in caplog.text
            nursery.cancel_scope.cancel()


async def test_the_payee_caps_payer_connections(
    connect: Connect, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await identity_of(connect, "bob")
    alice = await identity_of(connect, "alice")
    listener = OfferListener(bob, accept_all, PeerConfig(max_connections=2))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            held = []
            for _ in range(2):  # two payers' connections, their handshakes done
                payer_side, payee_side = trio.testing.memory_stream_pair()
                nursery.start_soon(listener.handle, payee_side)
                tls = trio.SSLStream(payer_side, alice.dialer_context, server_hostname="bob")
                await tls.do_handshake()
                held.append(tls)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.connections_open == 2
            refused, payee_side = trio.testing.memory_stream_pair()
            await listener.handle(payee_side)  # closed at once: no handshake, no task
            assert await closed_by_peer(refused, within=1)
            assert (listener.connections_open, listener.connections_accepted) == (2, 2)
            assert "limit payer-connections: 2 open" in caplog.text
            # One leaves: there is room again.
            await trio.aclose_forcefully(held.pop())
            await trio.testing.wait_all_tasks_blocked()
            assert listener.connections_open == 1
            _, payee_side = trio.testing.memory_stream_pair()
            nursery.start_soon(listener.handle, payee_side)
            await trio.testing.wait_all_tasks_blocked()
            assert (listener.connections_open, listener.connections_accepted) == (2, 3)
            # At the cap with one still in its handshake: that one makes way for the next.
            _, payee_side = trio.testing.memory_stream_pair()
            nursery.start_soon(listener.handle, payee_side)
            await trio.testing.wait_all_tasks_blocked()
            assert listener.connections_accepted == 4
            assert "made way for a new connection" in caplog.text
            nursery.cancel_scope.cancel()
    assert listener.connections_open == 0


async def test_a_payer_that_says_nothing_is_cut_at_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock,
    connect: Connect,
    server: Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="p2ppay.client.peer")
    bob = await identity_of(connect, "bob")
    listener = OfferListener(bob, accept_all, PeerConfig(handshake_timeout=10))
    silent, payee_side = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(20):
        await listener.handle(payee_side)  # returns once the deadline has passed
    assert trio.current_time() - start == pytest.approx(10)
    assert await closed_by_peer(silent, within=1)
    assert listener.connections_open == 0
    assert "payer connection: TLS handshake timed out" in caplog.text


# --- the payer's link ---------------------------------------------------------------------------


async def test_a_link_the_payee_closed_is_replaced_once(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100) as alice,
            open_wallet("bob", peer_config=PeerConfig(idle_timeout=0.2)) as bob,
        ):
            assert (await alice.pay("bob", 10)).balance == 90
            assert alice.dialer is not None and bob.listener is not None
            link = alice.dialer.links["bob"]
            # bob closes the idle connection; alice does not notice until she uses it.
            assert await closed_by_peer(link.stream, within=10)
            result = await alice.pay("bob", 15)
            assert result.balance == 75
            assert bob.listener.connections_accepted == 2
            assert alice.dialer.links["bob"] is not link
            assert await bob.balance() == 25


async def test_a_link_that_breaks_twice_is_unreachable(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("mallory") as mallory:
            # mallory's listener is replaced by one that hangs up on every offer.
            assert mallory.identity is not None and mallory.p2p_port is not None
            port = mallory.p2p_port
            context = mallory.identity.listener_context
            mallory.stop_listening()
            await trio.testing.wait_all_tasks_blocked()
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            offers = 0

            async def hang_up(transport: trio.SocketStream) -> None:
                nonlocal offers
                stream = trio.SSLStream(transport, context, server_side=True)
                try:
                    if await stream.receive_some():
                        offers += 1
                except trio.BrokenResourceError:
                    pass
                await trio.aclose_forcefully(stream)

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, hang_up, listeners)
                failure = await expect_failure("unreachable", alice, "mallory", 10)
                nursery.cancel_scope.cancel()
            assert failure.message == "the connection to mallory broke"
            assert offers == 2  # the offer, and once more on a new link
            assert alice.dialer is not None and "mallory" not in alice.dialer.links
            assert await alice.balance() == 100


# --- connecting to something that is not (or not trusted as) the server -------------------------


@asynccontextmanager
async def fake_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A TCP listener on loopback whose connections ``handler`` takes; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield port
        nursery.cancel_scope.cancel()


async def cannot_connect(port: int, ctx: ssl.SSLContext, request_timeout: float = 10) -> str:
    with pytest.raises(CannotConnect) as info:
        async with Wallet.open(
            "127.0.0.1", port, ctx, server_hostname="localhost", request_timeout=request_timeout
        ):
            pass
    message = str(info.value)
    prefix = f"cannot reach 127.0.0.1 port {port}: "
    assert message.startswith(prefix), message
    return message.removeprefix(prefix)


async def test_a_port_that_does_not_speak_tls(client_ctx: ssl.SSLContext) -> None:
    async def http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with fake_server(http) as port:
            reason = await cannot_connect(port, client_ctx)
    assert reason.startswith("TLS failed (")
    assert reason.endswith("); is this a p2ppay port?")


async def test_a_server_that_hangs_up_during_the_handshake(client_ctx: ssl.SSLContext) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with fake_server(hang_up) as port:
            reason = await cannot_connect(port, client_ctx)
    assert reason == (
        "the connection was closed during the TLS handshake (it may be refusing "
        "connections from your address: too many at once?)"
    )


async def test_a_server_whose_certificate_is_not_trusted(server_port: int) -> None:
    stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    trustme.CA().configure_trust(stranger)
    with trio.fail_after(10):
        reason = await cannot_connect(server_port, stranger)
    assert reason == (
        "its certificate is not trusted (unable to get local issuer certificate); "
        "check --cafile and --server-name"
    )


async def test_a_server_that_never_answers(
    autojump_clock: trio.testing.MockClock, client_ctx: ssl.SSLContext
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with fake_server(silent) as port:
        start = trio.current_time()
        assert await cannot_connect(port, client_ctx, request_timeout=20) == "no answer in time"
        assert trio.current_time() - start == pytest.approx(20)


async def test_what_a_wallet_refuses_before_asking_anyone(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=10) as alice, open_wallet("bob") as bob:
            with pytest.raises(ServerError) as info:
                await alice.login("alice", PASSWORD)
            assert (info.value.code, info.value.message) == (
                "already_logged_in",
                "already logged in; log out first",
            )
            assert alice.user == "alice"  # still, and still taking offers
            await bob.logout()
            await expect_failure(Outcome.NOT_LOGGED_IN, bob, "alice", 5)
            failure = await expect_failure(Outcome.INSUFFICIENT_FUNDS, alice, "bob", 11)
            assert failure.message == "your balance 10 is less than 11"
            # Refused before the lookup (bob is offline, which would say payee_offline).
            assert alice.dialer is not None and "bob" not in alice.dialer.links
