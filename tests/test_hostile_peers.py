"""What another logged-in user can do to a person's client, and what they cannot: paint lines
on its screen, claim payments it never accepted, keep everyone else from paying it."""

from __future__ import annotations

import os
import signal
import ssl
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pexpect
import pytest
import trio

from p2ppay import wire as p
from p2ppay.cli.terminal import printable
from p2ppay.client.connection import Client
from p2ppay.client.peer import PeerConfig
from p2ppay.client.wallet import NotSettledNews, OfferAnswered, PortUnavailable, Wallet, WalletEvent
from p2ppay.ledger import open_sqlite_ledger

from .conftest import Open, closed_by_peer
from .test_cli_client import client_cmd
from .test_loopback import server_process


def test_printable_shows_control_characters_instead_of_obeying_them() -> None:
    assert printable("alice paid you 5") == "alice paid you 5"
    forged = "x\n\x1b[1;32malice paid you 1000000\x1b[0m\x07\r\u202eevil"
    shown = printable(forged)
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown
    assert shown == "x\\n\\x1b[1;32malice paid you 1000000\\x1b[0m\\x07\\r\\u202eevil"


def pending(wallet: Wallet) -> list[WalletEvent]:
    """The events the wallet has now, without waiting for more."""
    events: list[WalletEvent] = []
    while True:
        try:
            events.append(wallet.events.receive_nowait())
        except trio.WouldBlock:
            return events


async def test_a_payee_hears_not_settled_only_about_offers_it_accepted(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("bob") as bob,
            open_wallet("mallory", deposit=10) as mallory,
        ):
            assert mallory.dialer is not None and bob.p2p_port is not None
            where = p.Presence("bob", "127.0.0.1", bob.p2p_port)
            # A claim about a payment bob never saw, then a real offer on the same link: once
            # its answer is back, bob's listener has read the claim (lines are read in order).
            forged = p.NotSettled(uuid.uuid4(), "x\n\x1b[32malice paid you 1000000")
            offer = p.Offer(uuid.uuid4(), "mallory", "bob", 1)
            await mallory.dialer.offer(where, offer)  # opens the link
            await mallory.dialer.tell("bob", forged)
            answer = await mallory.dialer.offer(where, p.Offer(uuid.uuid4(), "mallory", "bob", 2))
            assert isinstance(answer, p.Accept)
            seen = pending(bob)
            assert not [e for e in seen if isinstance(e, NotSettledNews)], seen
            assert [e.offer.amount for e in seen if isinstance(e, OfferAnswered)] == [1, 2]
            # The news about an offer bob did accept reaches him, once.
            news = p.NotSettled(offer.payment_id, "the server refused it")
            await mallory.dialer.tell("bob", news)
            await mallory.dialer.tell("bob", news)
            await mallory.dialer.offer(where, p.Offer(uuid.uuid4(), "mallory", "bob", 3))
            told = [e for e in pending(bob) if isinstance(e, NotSettledNews)]
            assert told == [NotSettledNews("mallory", news)]


async def test_one_address_cannot_take_every_payer_connection(open_wallet: Open) -> None:
    """Sockets that never start TLS fill the payee's connections: the one whose handshake has
    taken longest makes way for each newcomer, so a payer still gets in (and many people
    paying from one address, a classroom behind a NAT, are not turned away for it)."""
    config = PeerConfig(max_connections=10, max_handshaking=6)
    with trio.fail_after(30):
        async with (
            open_wallet("bob", peer_config=config) as bob,
            open_wallet("alice", deposit=10) as alice,
        ):
            assert bob.p2p_port is not None and bob.listener is not None
            hogs = [
                await trio.open_tcp_stream("127.0.0.1", bob.p2p_port, local_address="127.0.0.2")
                for _ in range(10)
            ]
            closed: list[bool] = []

            async def watch(stream: trio.SocketStream) -> None:
                closed.append(await closed_by_peer(stream, within=1))

            async with trio.open_nursery() as nursery:
                for hog in hogs:
                    nursery.start_soon(watch, hog)
            assert closed.count(False) == config.max_handshaking  # the newest six are held
            paid = await alice.pay("bob", 5)
            assert paid.balance == 5
            for hog in hogs:
                await trio.aclose_forcefully(hog)


async def test_many_addresses_that_never_finish_a_handshake_make_way(
    open_wallet: Open,
) -> None:
    """Sockets that never start TLS, from more addresses than the caps reckon with, still
    cannot keep a payer out: the one whose handshake has taken longest makes way."""
    config = PeerConfig(max_connections=12, max_handshaking=6)
    with trio.fail_after(30):
        async with (
            open_wallet("bob", peer_config=config) as bob,
            open_wallet("alice", deposit=10) as alice,
        ):
            assert bob.p2p_port is not None and bob.listener is not None
            hogs = [
                await trio.open_tcp_stream(
                    "127.0.0.1", bob.p2p_port, local_address=f"127.0.0.{10 + i // 4}"
                )
                for i in range(32)  # 8 addresses x 4
            ]
            paid = await alice.pay("bob", 5)
            assert paid.balance == 5
            assert bob.listener.connections_open <= config.max_connections + 1
            for hog in hogs:
                await trio.aclose_forcefully(hog)


async def test_a_payer_cannot_unsay_a_payment_that_reached_the_payee(
    open_wallet: Open,
) -> None:
    with trio.fail_after(30):
        async with open_wallet("bob") as bob, open_wallet("mallory", deposit=10) as mallory:
            assert mallory.dialer is not None and bob.p2p_port is not None
            paid = await mallory.pay("bob", 2)
            async for event in bob.events:  # the server's word that it arrived
                if isinstance(event, p.PaymentReceived):
                    break
            await mallory.dialer.tell("bob", p.NotSettled(paid.payment_id, "reversed, pay again"))
            where = p.Presence("bob", "127.0.0.1", bob.p2p_port)
            await mallory.dialer.offer(where, p.Offer(uuid.uuid4(), "mallory", "bob", 1))
            assert not [e for e in pending(bob) if isinstance(e, NotSettledNews)]


async def test_an_address_the_machine_does_not_have_is_explained(
    server_port: int, client_ctx: ssl.SSLContext
) -> None:
    def connect() -> AbstractAsyncContextManager[Client]:
        return Client.connect(
            "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
        )

    with trio.fail_after(30):
        async with Wallet.using(connect, listen_host="192.0.2.1") as wallet:  # TEST-NET-1
            await wallet.register("erin", "correct horse")
            with pytest.raises(PortUnavailable, match="this machine has no such address"):
                await wallet.login("erin", "correct horse")
            assert wallet.user is None


async def test_the_ledger_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with open_sqlite_ledger(path) as ledger:
        await ledger.create_account("alice", "h")
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_sigterm_ends_an_interactive_client_at_its_prompt(tmp_path: Path) -> None:
    trio.run(_sigterm_at_prompt, tmp_path)


async def _sigterm_at_prompt(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    async with server_process(state) as srv:
        cmd = client_cmd(srv.port, state, "--listen-port", "0")
        shell = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=20)
        try:
            await trio.to_thread.run_sync(shell.expect_exact, "p2ppay>")
            shell.kill(signal.SIGTERM)  # nothing typed: the prompt is waiting for a person
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
            output = shell.before or ""
        finally:
            shell.close(force=True)
    assert "Traceback" not in output, output
    assert shell.exitstatus == 0 and shell.signalstatus is None
