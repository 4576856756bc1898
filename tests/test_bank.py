"""The bank test: random payments by many clients while the server is SIGKILLed and restarted.

A short run is part of the normal suite; ``nox -s soak`` runs a long one (P2PPAY_SOAK=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .bank import broken_server_command, run_bank, soak_enabled

pytestmark = pytest.mark.slow


async def test_bank_survives_crashes(tmp_path: Path) -> None:
    report = await run_bank(tmp_path, seed=7, clients=6, payments_per_client=40, kills=3)
    assert report.problems == []
    assert report.kills == 3
    assert len(report.acknowledged) + len(report.refused) == 6 * 40
    assert len(report.acknowledged) > 100  # most of them went through


@pytest.mark.skipif(not soak_enabled(), reason="long; run with nox -s soak (P2PPAY_SOAK=1)")
@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_bank_soak(tmp_path: Path, seed: int) -> None:
    report = await run_bank(tmp_path, seed=seed, clients=32, payments_per_client=800, kills=30)
    assert report.problems == []
    assert report.kills == 30


async def test_bank_across_two_nodes_survives_crashes(tmp_path: Path, postgres_url: str) -> None:
    """Two server processes on one PostgreSQL ledger, clients split over them and moving to
    the other node when theirs fails, nodes SIGKILLed at random: nothing acknowledged is lost,
    nothing is applied twice (a payment whose answer a crash lost is retried on the other
    node, by its id), and the money adds up."""
    report = await run_bank(
        tmp_path,
        seed=21,
        clients=6,
        payments_per_client=40,
        kills=4,
        ledger=postgres_url,
        nodes=2,
    )
    assert report.problems == []
    assert report.kills == 4
    assert len(report.acknowledged) + len(report.refused) == 6 * 40
    assert len(report.acknowledged) > 100


@pytest.mark.skipif(not soak_enabled(), reason="long; run with nox -s soak (P2PPAY_SOAK=1)")
@pytest.mark.parametrize("seed", [31, 32])
async def test_bank_soak_across_two_nodes(tmp_path: Path, postgres_url: str, seed: int) -> None:
    report = await run_bank(
        tmp_path,
        seed=seed,
        clients=32,
        payments_per_client=400,
        kills=20,
        ledger=postgres_url,
        nodes=2,
    )
    assert report.problems == []
    assert report.kills == 20


async def test_the_bank_test_catches_a_ledger_that_acknowledges_before_commit(
    tmp_path: Path,
) -> None:
    """The check is real: the same run against a ledger that answers before it commits
    finds acknowledged payments missing after a crash."""
    report = await run_bank(
        tmp_path,
        seed=7,
        clients=6,
        payments_per_client=40,
        kills=3,
        server_command=broken_server_command(tmp_path),
    )
    assert any("is not in the ledger" in problem for problem in report.problems), report.problems


async def test_sigterm_under_load_loses_nothing_and_exits_zero(tmp_path: Path) -> None:
    """Graceful shutdown: no new work, in-flight settlements committed *and* acknowledged
    (or neither), exit status 0 within the grace period."""
    import base64
    import signal
    import sys
    import uuid

    import trio

    from p2ppay import wire as p
    from p2ppay.client.connection import Client, ConnectionLost, ServerError
    from p2ppay.client.peer import PeerKey
    from p2ppay.ledger import open_sqlite_ledger
    from p2ppay.pki import sign_acceptance
    from p2ppay.tls import client_context

    from .bank import PASSWORD, ServerRunner

    state = tmp_path / "state"
    runner = ServerRunner(state, [sys.executable, "-m", "p2ppay"])
    names = [f"load{i:02d}" for i in range(20)]
    keys = {name: PeerKey() for name in names}
    acknowledged: dict[uuid.UUID, p.SettleResult] = {}
    refused: dict[uuid.UUID, str] = {}
    sent = 0
    with trio.fail_after(60):
        async with runner.running():
            ctx = client_context(state / "ca.pem")
            clients: list[Client] = []
            async with trio.open_nursery() as nursery:
                ready = trio.Event()

                async def client_for(name: str) -> None:
                    async with Client.connect("127.0.0.1", runner.port, ssl_context=ctx) as c:
                        await c.register(name, PASSWORD)
                        await c.login(name, PASSWORD, None, keys[name].csr(name))
                        await c.deposit(1_000_000)
                        clients.append(c)
                        if len(clients) == len(names):
                            ready.set()
                        await trio.sleep_forever()

                for name in names:
                    nursery.start_soon(client_for, name)
                await ready.wait()

                async def pay_forever(i: int) -> None:
                    nonlocal sent
                    client = clients[i]
                    assert client.user is not None
                    payee = names[(names.index(client.user) + 1) % len(names)]
                    while True:
                        pid = uuid.uuid4()
                        sig = sign_acceptance(keys[payee].key, str(pid), client.user, payee, 1)
                        sent += 1
                        try:
                            acknowledged[pid] = await client.settle(
                                pid, payee, 1, base64.b64encode(sig).decode()
                            )
                        except ServerError as exc:
                            refused[pid] = exc.code
                        except ConnectionLost:
                            return

                async with trio.open_nursery() as load:
                    for i in range(len(clients)):
                        load.start_soon(pay_forever, i)
                    await trio.sleep(1.0)  # under load...
                    assert runner.process is not None
                    runner.process.send_signal(signal.SIGTERM)  # ...the operator stops it
                    with trio.fail_after(15):
                        status = await runner.process.wait()
                assert status == 0
                nursery.cancel_scope.cancel()
    assert len(acknowledged) > 100
    assert set(refused.values()) <= {"shutting_down"}
    async with open_sqlite_ledger(state / "ledger.sqlite3") as ledger:
        audit = await ledger.audit()
        committed = 0
        for pid, result in acknowledged.items():
            t = await ledger.transfer(pid)
            assert t is not None and t.amount == result.amount
            committed += 1
        for pid in refused:
            assert await ledger.transfer(pid) is None
    assert audit.conserved
    # Every committed settlement was acknowledged: nothing done behind a client's back.
    assert audit.transfers == committed
