"""Clients recover by themselves: a logged-in wallet (and so ``client -c serve`` and the
interactive shell) reconnects after a server restart, logs in again and takes payments."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2ppay import wire as p
from p2ppay.client.connection import Client
from p2ppay.client.peer import accept_all
from p2ppay.client.wallet import (
    CannotConnect,
    Disconnected,
    LoggedOut,
    PaymentFailed,
    PortUnavailable,
    Reconnected,
    Wallet,
    WalletEvent,
)
from p2ppay.ledger import SqliteLedger, open_sqlite_ledger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig

from .conftest import FAST_SCRYPT, PASSWORD
from .test_cli_client import client_cmd, json_lines, run_client
from .test_loopback import server_process

#: Quick waits so the tests stay fast; the real defaults are 0.25 s up to 4 s.
FAST_RECONNECT = (0.05, 0.4)


@dataclass
class Running:
    server: Server
    port: int
    stopped: trio.Event

    async def stop(self) -> None:
        self.server.shutdown()
        await self.stopped.wait()


async def start_server(
    nursery: trio.Nursery,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    issuer: Issuer,
    port: int = 0,
) -> Running:
    """A server on loopback ``port`` (0: any) in ``nursery``, until its ``stop()``."""
    server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]]) -> None:
        try:
            await server.serve(listeners, task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run)
    return Running(server, listeners[0].socket.getsockname()[1], stopped)


def wallet_on(port: int, client_ctx: ssl.SSLContext) -> AbstractAsyncContextManager[Wallet]:
    def connect() -> AbstractAsyncContextManager[Client]:
        return Client.connect(
            "127.0.0.1", port, ssl_context=client_ctx, server_hostname="localhost"
        )

    return Wallet.using(
        connect,
        policy=accept_all,
        listen_host="127.0.0.1",
        server_address=f"127.0.0.1 port {port}",
        reconnect_delays=FAST_RECONNECT,
    )


async def next_of(wallet: Wallet, kind: type[WalletEvent]) -> WalletEvent:
    """The wallet's next event of ``kind`` (others are skipped)."""
    async for event in wallet.events:
        if isinstance(event, kind):
            return event
    raise AssertionError("the wallet's events ended")


async def test_wallets_reconnect_log_in_again_and_take_payments(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    with trio.fail_after(30):
        async with (
            open_sqlite_ledger(tmp_path / "ledger.sqlite3") as ledger,
            trio.open_nursery() as nursery,
        ):
            first = await start_server(nursery, ledger, server_ctx, issuer)
            port = first.port
            async with wallet_on(port, client_ctx) as bob, wallet_on(port, client_ctx) as al:
                await bob.register("bob", PASSWORD)
                await bob.login("bob", PASSWORD)
                await al.register("alice", PASSWORD)
                await al.login("alice", PASSWORD)
                await al.deposit(100)
                bob_port = bob.p2p_port

                await first.stop()  # the server goes away...
                lost = await next_of(bob, Disconnected)
                assert isinstance(lost, Disconnected) and lost.reconnecting

                # ...and comes back on the same port: both log in again by themselves.
                again = await start_server(nursery, ledger, server_ctx, issuer, port)
                with trio.fail_after(10):
                    back = await next_of(bob, Reconnected)
                    await next_of(al, Reconnected)
                assert back == Reconnected("bob")
                assert set(again.server.presence.names()) == {"alice", "bob"}
                # The offer listener from before the restart takes the payment.
                assert bob.p2p_port == bob_port
                paid = await al.pay("bob", 30)
                assert paid.balance == 70
                received = await next_of(bob, p.PaymentReceived)
                assert isinstance(received, p.PaymentReceived) and received.balance == 30
                await again.stop()


async def test_a_replaced_session_does_not_come_back(
    server_port: int, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(30):
        async with wallet_on(server_port, client_ctx) as first:
            await first.register("carol", PASSWORD)
            await first.login("carol", PASSWORD)
            async with wallet_on(server_port, client_ctx) as second:
                await second.login("carol", PASSWORD)
                replaced = await next_of(first, p.SessionReplaced)
                assert isinstance(replaced, p.SessionReplaced)
                lost = await next_of(first, Disconnected)
                # Logged out by a newer login: coming back would take the session back.
                assert isinstance(lost, Disconnected) and not lost.reconnecting
                assert first.user is None
                assert second.user == "carol"


async def test_refused_login_after_a_restart_logs_out(
    tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    """The server comes back with a ledger that does not know us: stop trying, say why."""
    with trio.fail_after(30):
        async with (
            open_sqlite_ledger(tmp_path / "one.sqlite3") as one,
            open_sqlite_ledger(tmp_path / "two.sqlite3") as two,
            trio.open_nursery() as nursery,
        ):
            first = await start_server(nursery, one, server_ctx, issuer)
            async with wallet_on(first.port, client_ctx) as dave:
                await dave.register("dave", PASSWORD)
                await dave.login("dave", PASSWORD)
                await first.stop()
                again = await start_server(nursery, two, server_ctx, issuer, first.port)
                gone = await next_of(dave, LoggedOut)
                assert isinstance(gone, LoggedOut)
                assert (
                    gone.reason == "could not log in again as dave: unknown user or wrong password"
                )
                assert dave.user is None
                await again.stop()


async def test_no_server_is_one_clear_error(client_ctx: ssl.SSLContext) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nobody listens there now
    with trio.fail_after(10), pytest.raises(CannotConnect) as info:
        async with wallet_on(port, client_ctx):
            raise AssertionError("connected to nobody")
    assert str(info.value) == f"cannot reach 127.0.0.1 port {port}: connection refused"


async def test_a_taken_payment_port_is_explained_and_does_not_stick(
    server_port: int, client_ctx: ssl.SSLContext
) -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    with trio.fail_after(30):
        async with wallet_on(server_port, client_ctx) as erin:
            await erin.register("erin", PASSWORD)
            with pytest.raises(PortUnavailable) as info:
                await erin.login("erin", PASSWORD, listen_port=port)
            assert str(info.value) == (
                f"port {port} is already in use on this machine; choose another port for payments"
            )
            assert erin.user is None
            result = await erin.login("erin", PASSWORD, listen_port=0)
            assert result.name == "erin" and erin.p2p_port not in (None, port)
    await taken.aclose()


async def test_a_decline_says_so_once(server_port: int, client_ctx: ssl.SSLContext) -> None:
    with trio.fail_after(30):
        async with wallet_on(server_port, client_ctx) as payer:

            def connect() -> AbstractAsyncContextManager[Client]:
                return Client.connect(
                    "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
                )

            async with Wallet.using(connect, listen_host="127.0.0.1") as payee:  # declines all
                await payee.register("fred", PASSWORD)
                await payee.login("fred", PASSWORD)
                await payer.register("gina", PASSWORD)
                await payer.login("gina", PASSWORD)
                await payer.deposit(10)
                offered: list[p.Offer] = []
                with pytest.raises(PaymentFailed) as info:
                    await payer.pay("fred", 5, on_offer=offered.append)
                assert (info.value.code, info.value.message) == (
                    "declined",
                    "fred declined the payment",
                )
                assert [(o.payee, o.amount) for o in offered] == [("fred", 5)]
                # No offer is announced for a payment refused before anyone is asked.
                for name, amount, code in (("gina", 1, "self_payment"), ("nobody", 1, "")):
                    with pytest.raises(PaymentFailed) as refused:
                        await payer.pay(name, amount, on_offer=offered.append)
                    assert not code or refused.value.code == code
                assert len(offered) == 1


# --- the real command line -------------------------------------------------------------------


@pytest.mark.slow
async def test_serve_comes_back_after_the_server_is_killed_and_restarted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "bob.pw").write_text("bob's password\n")
    with trio.fail_after(120):
        async with server_process(state) as srv:
            port = srv.port
            done = await run_client(
                port, state, "--user", "bob", "--password-file", str(tmp_path / "bob.pw"),
                "-c", "register",
            )  # fmt: skip
            assert done.returncode == 0, done.stdout
            done = await run_client(
                port, state, "--user", "alice", "-c", "register; deposit 100",
                password="alice's password",
            )  # fmt: skip
            assert done.returncode == 0, done.stdout
            bob = await trio.lowlevel.open_process(
                client_cmd(
                    port,
                    state,
                    "--user",
                    "bob",
                    "--password-file",
                    str(tmp_path / "bob.pw"),
                    "--accept",
                    "all",
                    "--json",
                    "-c",
                    "serve",
                ),
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            out = bytearray()

            async def wait_for(text: bytes) -> None:
                assert bob.stdout is not None
                while text not in out:
                    chunk = await bob.stdout.receive_some()
                    assert chunk, f"bob's client ended: {out!r}"
                    out.extend(chunk)

            try:
                await wait_for(b'"command": "login"')
                srv.process.send_signal(signal.SIGKILL)  # no goodbye at all
                await wait_for(b'"reconnecting": true')
            except BaseException:
                bob.kill()
                raise
        try:
            async with server_process(state, "--port", str(port)) as again:
                assert again.port == port
                back_at = trio.current_time()
                await wait_for(b'"event": "reconnected"')
                assert trio.current_time() - back_at < 10
                paid = await run_client(
                    port, state, "--user", "alice", "--json", "-c", "pay bob 30",
                    password="alice's password",
                )  # fmt: skip
                assert paid.returncode == 0, paid.stdout
                await wait_for(b'"balance": 30')
                bob.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    assert await bob.wait() == 0
        finally:
            if bob.returncode is None:
                bob.kill()
    events = [x["event"] for x in json_lines(bytes(out)) if "event" in x]
    assert events == ["disconnected", "reconnected", "offer_answered", "payment_received"], events
    assert json.loads(bytes(out).splitlines()[0])["command"] == "login"
