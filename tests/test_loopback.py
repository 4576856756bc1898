"""The real TCP listener on loopback (port 0), and the real CLI as a subprocess."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost
from p2ppay.ledger import SqliteLedger, open_sqlite_ledger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig
from p2ppay.tls import client_context

from .conftest import FAST_SCRYPT, login, next_event, pay, registered
from .processes import Proc, spawn


async def test_real_listener_observes_loopback_addresses(
    issuer: Issuer, ledger: SqliteLedger, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, listeners)
            port = listeners[0].socket.getsockname()[1]
            async with (
                Client.connect(
                    "127.0.0.1", port, ssl_context=client_ctx, server_hostname="localhost"
                ) as alice,
                Client.connect(
                    "127.0.0.1", port, ssl_context=client_ctx, server_hostname="localhost"
                ) as bob,
            ):
                await registered(alice, "alice", p2p_port=9001, deposit=50)
                await registered(bob, "bob", p2p_port=9002)
                listing = await bob.list()
                assert listing.online == [
                    p.Presence("alice", "127.0.0.1", 9001),
                    p.Presence("bob", "127.0.0.1", 9002),
                ]
                await pay(alice, "bob", 20)
                event = await next_event(bob)
                assert isinstance(event, p.PaymentReceived) and event.balance == 20
            server.shutdown()
    assert not server.sessions


# --- the real command line -------------------------------------------------------------------


ServerProcess = Proc  # a server subprocess: .process, .port, .log


@asynccontextmanager
async def server_process(
    state_dir: Path, *args: str, env_state: bool = False
) -> AsyncIterator[Proc]:
    """``python -m p2ppay server`` on a free loopback port; yields once it listens (the same
    process helper the benchmark uses; it stops the server on the way out)."""
    cmd = [sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
           "--scrypt-n", "16", *args]  # fmt: skip
    env = dict(os.environ)
    if env_state:
        env["P2PPAY_STATE_DIR"] = str(state_dir)
    else:
        cmd += ["--state-dir", str(state_dir)]
    async with spawn(cmd, "listening on 127.0.0.1", env=env) as proc:
        yield proc


@pytest.mark.slow
async def test_cli_server_starts_with_defaults_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with server_process(state, env_state=True) as srv:
            async with Client.connect(
                "127.0.0.1", srv.port, ssl_context=client_context(state / "ca.pem")
            ) as client:
                await registered(client, "alice", deposit=10)
                srv.process.send_signal(signal.SIGTERM)
                event = await next_event(client, 10)
                assert isinstance(event, p.ServerClosing)
                with pytest.raises(ConnectionLost):
                    await next_event(client, 10)
            assert await srv.process.wait() == 0
    assert any("stopped" in line for line in srv.log)
    assert (state / "ca.pem").is_file() and (state / "ledger.sqlite3").is_file()


@pytest.mark.slow
async def test_acknowledged_payments_survive_sigkill(tmp_path: Path) -> None:
    state = tmp_path / "state"
    acknowledged: list[p.SettleResult] = []
    with trio.fail_after(90):
        async with server_process(state) as srv:
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as bob,
            ):
                await registered(alice, "alice", deposit=1000)
                await registered(bob, "bob", deposit=1000)

                async def pay_once(payer: Client, payee: str, amount: int) -> None:
                    acknowledged.append(await pay(payer, payee, amount))

                async with trio.open_nursery() as nursery:  # concurrent: group commits
                    for i in range(40):
                        nursery.start_soon(pay_once, alice, "bob", 1 + i % 7)
                        nursery.start_soon(pay_once, bob, "alice", 1 + i % 5)
                # Killed right after the last acknowledgement, no chance to flush anything.
                srv.process.kill()
                assert await srv.process.wait() == -signal.SIGKILL

        async with server_process(state) as srv:
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as bob,
            ):
                await login(alice, "alice")
                await login(bob, "bob")
                for result in acknowledged:
                    payer = alice if result.payer == "alice" else bob
                    # Replaying each acknowledged payment gives the stored outcome, unchanged.
                    assert (
                        await pay(payer, result.payee, result.amount, result.payment_id) == result
                    )
                sent_by_alice = sum(r.amount for r in acknowledged if r.payer == "alice")
                sent_by_bob = sum(r.amount for r in acknowledged if r.payer == "bob")
                assert (await alice.list()).balance == 1000 - sent_by_alice + sent_by_bob
                assert (await bob.list()).balance == 1000 - sent_by_bob + sent_by_alice
                seen = {e.payment_id for e in await alice.history(limit=1000)}
                assert {r.payment_id for r in acknowledged} <= seen
            srv.process.send_signal(signal.SIGTERM)
            assert await srv.process.wait() == 0
    async with open_sqlite_ledger(state / "ledger.sqlite3") as ledger:
        audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 2000
    assert audit.transfers == len(acknowledged) == 80
    assert len({r.payment_id for r in acknowledged}) == 80
    assert all(isinstance(r.payment_id, uuid.UUID) for r in acknowledged)


@pytest.mark.slow
def test_cli_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2ppay",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert "already in use" in done.stderr
    assert "Traceback" not in done.stderr
