"""The peer-to-peer leg in memory: a payee's listener and a payer's link over in-memory TLS,
with the certificates a real (in-memory) server issued at login."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.client.outcomes import Outcome
from p2ppay.client.peer import (
    Dialer,
    OfferListener,
    PeerError,
    PeerIdentity,
    PeerLink,
    accept_all,
)
from p2ppay.pki import verify_acceptance
from p2ppay.server import Server

from .conftest import Connect
from .test_wallet_errors import identity_of


@pytest.fixture
async def pair(connect: Connect, server: Server) -> tuple[PeerIdentity, PeerIdentity]:
    return await identity_of(connect, "alice"), await identity_of(connect, "bob")


@asynccontextmanager
async def dialled(
    listener: OfferListener, payer: PeerIdentity
) -> AsyncIterator[trio.SSLStream[Any]]:
    """A payer's TLS connection to ``listener``, over memory."""
    payer_side, payee_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener.handle, payee_side)
        stream: trio.SSLStream[Any] = trio.SSLStream(payer_side, payer.dialer_context)
        await stream.do_handshake()
        yield stream
        await trio.aclose_forcefully(stream)


async def read_message(stream: trio.abc.Stream, lines: p.LineBuffer) -> p.PeerMessage:
    while (line := lines.next_line()) is None:
        lines.feed(await stream.receive_some())
    return p.decode_peer_message(line)


async def test_the_listener_answers_offers_and_takes_news(
    pair: tuple[PeerIdentity, PeerIdentity],
) -> None:
    alice, bob = pair
    listener = OfferListener(bob, accept_all)
    news: list[tuple[str, p.NotSettled]] = []
    pid = uuid.uuid4()
    with trio.fail_after(10):
        async with dialled(listener, alice) as stream:
            lines = p.LineBuffer()
            # Blank lines are skipped; what is not an offer is declined, and the line goes on.
            await stream.send_all(b"\n  \n" + p.encode_peer_message(p.Accept(pid, "c2ln")))
            assert await read_message(stream, lines) == p.Decline(None, "expected an offer")
            # News of an unsettled payment, with nobody listening for it: no answer.
            await stream.send_all(p.encode_peer_message(p.NotSettled(pid, "lost")))
            await trio.testing.wait_all_tasks_blocked()
            listener.on_not_settled = lambda payer, message: news.append((payer, message))
            # News of an offer bob never accepted is not passed on (anyone could send it).
            await stream.send_all(p.encode_peer_message(p.NotSettled(pid, "refused")))
            await stream.send_all(p.encode_peer_message(p.Offer(pid, "alice", "bob", 5)))
            answer = await read_message(stream, lines)
            assert isinstance(answer, p.Accept) and answer.payment_id == pid
            signature = base64.b64decode(answer.signature)
            public = bob.key.public_key()
            assert verify_acceptance(public, signature, str(pid), "alice", "bob", 5)
            assert news == []
            # Of the offer bob did accept, it is, once.
            await stream.send_all(p.encode_peer_message(p.NotSettled(pid, "refused")) * 2)
            await stream.send_all(p.encode_peer_message(p.Offer(uuid.uuid4(), "alice", "bob", 6)))
            assert isinstance(await read_message(stream, lines), p.Accept)
    assert news == [("alice", p.NotSettled(pid, "refused"))]
    assert listener.connections_open == 0


@asynccontextmanager
async def link_to_fake_payee(
    payer: PeerIdentity, payee: PeerIdentity, answers: bytes
) -> AsyncIterator[PeerLink]:
    """A link to a payee that answers the first offer with ``answers`` (raw lines)."""
    payer_side, payee_side = trio.testing.memory_stream_pair()

    async def fake_payee() -> None:
        stream = trio.SSLStream(payee_side, payee.listener_context, server_side=True)
        lines = p.LineBuffer()
        await read_message(stream, lines)
        await stream.send_all(answers)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_payee)
        stream: trio.SSLStream[Any] = trio.SSLStream(payer_side, payer.dialer_context)
        yield PeerLink(payee.name, stream, 4096)
        nursery.cancel_scope.cancel()


async def test_a_link_skips_answers_to_offers_given_up_on(
    pair: tuple[PeerIdentity, PeerIdentity],
) -> None:
    alice, bob = pair
    old, new = uuid.uuid4(), uuid.uuid4()
    offer = p.Offer(new, "alice", "bob", 5)
    stale = p.encode_peer_message(p.Decline(old, "no answer in time"))
    current = p.encode_peer_message(p.Decline(new, "declined"))
    with trio.fail_after(10):
        async with link_to_fake_payee(alice, bob, stale + current) as link:
            assert await link.ask(offer) == p.Decline(new, "declined")
            assert link.offers_sent == 1
        # A decline that names no payment (the payee could not read the offer) is the answer.
        general = p.encode_peer_message(p.Decline(None, "too long"))
        async with link_to_fake_payee(alice, bob, stale + general) as link:
            assert await link.ask(offer) == p.Decline(None, "too long")
        # Garbage is the caller's to handle (the dialer calls it bad_answer).
        async with link_to_fake_payee(alice, bob, b"{not json\n") as link:
            with pytest.raises(p.RemoteProtocolError):
                await link.ask(offer)


async def test_a_payee_online_without_a_port_is_unreachable(
    pair: tuple[PeerIdentity, PeerIdentity],
) -> None:
    alice, _ = pair
    dialer = Dialer(alice)
    offer = p.Offer(uuid.uuid4(), "alice", "bob", 5)
    with trio.fail_after(10), pytest.raises(PeerError) as info:
        await dialer.offer(p.Presence("bob", "10.0.0.2", None), offer)
    assert info.value.code is Outcome.UNREACHABLE
    assert info.value.message == "bob is online but takes no payments"
    assert "bob" not in dialer.links
    # News for a payee with no link is dropped quietly.
    await dialer.tell("bob", p.NotSettled(offer.payment_id, "never offered"))
    assert "bob" not in dialer.links
