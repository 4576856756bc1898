"""Issue 9, item 4: a storm of wrong passwords from some addresses must not starve a correct
login from another, and one address's queue of password checks is bounded.

The hashing threads are replaced by :class:`Turns`, which holds each "hash" until the test lets
it finish: the tests decide the order of events, so they need no real scrypt and no clock."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing

from p2ppay.client.connection import ServerError
from p2ppay.ledger import SqliteLedger
from p2ppay.passwords import verify_password
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig

from .conftest import PASSWORD, Connect, expect_error

QUEUE = 8  # password checks one address may have waiting


class Turns:
    """Stands in for the hashing threads. While ``hold`` is set, each hash job, once started,
    waits until the test takes it with :meth:`started` and sets the event it gets."""

    def __init__(self) -> None:
        self.hold = False
        self._send, self._receive = trio.open_memory_channel[trio.Event](0)

    async def work(self, fn: Callable[[], Any]) -> Any:
        if self.hold:
            finish = trio.Event()
            await self._send.send(finish)
            await finish.wait()
        return fn()

    async def started(self) -> trio.Event:
        """The next job that has started (it is running now); set the event to finish it."""
        return await self._receive.receive()


@pytest.fixture
def turns() -> Turns:
    return Turns()


@pytest.fixture
async def server(
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    issuer: Issuer,
    config: ServerConfig,
    turns: Turns,
) -> AsyncIterator[Server]:
    """The conftest server, with one "hashing thread" that the test drives."""
    cfg = replace(config, hash_threads=1, hash_queue_per_address=QUEUE)
    srv = Server(ledger, server_ctx, issuer, cfg, hash_work=turns.work)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run_in_memory)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords the server checks, in the order their hashes run."""
    order: list[str] = []

    def spy(password: str, stored: str) -> bool:
        order.append(password)
        return verify_password(password, stored)

    monkeypatch.setattr("p2ppay.server.accounts.verify_password", spy)
    return order


async def settled() -> None:
    """Until nothing moves: no thread works for a task (the ledger's) and every task waits
    on another task. What is queued then stays queued until the test lets a hash finish."""
    while True:
        await trio.testing.wait_all_threads_completed()
        await trio.testing.wait_all_tasks_blocked()
        if trio.testing.active_thread_count() == 0:
            return


async def test_a_quiet_address_is_not_starved_by_a_storm_of_guesses(
    connect: Connect, server: Server, turns: Turns, checked: list[str]
) -> None:
    """10 addresses x 12 connections guess the owner's password, one hash at a time. Each
    address gets QUEUE checks waiting, the rest are refused at once; the addresses take turns;
    and the owner's login from a quiet address is the very next hash to run, not the 81st
    (first come, first served) nor the 11th (round robin with newcomers at the back)."""
    addresses = [f"10.66.0.{a}" for a in range(10)]
    with trio.fail_after(30):
        async with connect("10.0.0.1") as owner:
            await owner.register("owner", PASSWORD)  # hashes are not held yet
        turns.hold = True
        refused: dict[str, list[ServerError]] = {a: [] for a in addresses}
        all_overflowing = trio.Event()

        async def guess(address: str, k: int) -> None:
            """Guess again after each wrong guess; stop when refused."""
            async with connect(address) as client:
                for n in range(1000):
                    try:
                        await client.login("owner", f"guess {k}.{n} from {address}")
                    except ServerError as exc:
                        if exc.code == "auth_failed":
                            continue
                        refused[address].append(exc)
                        if all(refused.values()):
                            all_overflowing.set()
                        return

        async with trio.open_nursery() as storm:
            for address in addresses:
                for k in range(12):
                    storm.start_soon(guess, address, k)
            await all_overflowing.wait()
            await settled()
            # One guess is being hashed and each address has its queue full (one of them
            # perhaps one short: the guess that runs may have left it after it overflowed);
            # the rest were refused without waiting for any hash.
            storm_waiting = server.accounts.hasher.waiting()
            assert all(server.accounts.hasher.waiting(a) >= QUEUE - 1 for a in addresses)
            assert storm_waiting >= QUEUE * len(addresses) - 1
            assert sum(map(len, refused.values())) == 12 * len(addresses) - storm_waiting - 1
            for exc in (e for errors in refused.values() for e in errors):
                assert exc.code == "rate_limited"
                assert exc.message == (
                    "too many logins from your address are waiting to be checked; try again in 1 s"
                )
            # Two rounds of the storm: the addresses take turns, each guessing again at once.
            running = await turns.started()
            for _ in range(2 * len(addresses)):
                running.set()
                running = await turns.started()
            assert sorted(c.split()[-1] for c in checked) == sorted(2 * addresses)
            await settled()
            storm_waiting = server.accounts.hasher.waiting()
            assert storm_waiting >= QUEUE * len(addresses) - 1

            async with connect("10.0.0.1") as quiet, trio.open_nursery() as nursery:
                logged_in: list[str] = []

                async def log_in() -> None:
                    logged_in.append((await quiet.login("owner", PASSWORD)).name)

                nursery.start_soon(log_in)
                await settled()
                assert server.accounts.hasher.waiting("10.0.0.1") == 1
                running.set()  # the storm's guess that was running finishes...
                (await turns.started()).set()  # ...and the next hash to run is the owner's
            assert logged_in == ["owner"]
            assert checked[-1] == PASSWORD and len(checked) == 2 * len(addresses) + 2
            storm.cancel_scope.cancel()
        # The storm hung up: its waiting checks were taken back, none of them computed.
        await settled()
        assert server.accounts.hasher.waiting() == 0
        assert len(checked) == 2 * len(addresses) + 2


async def test_a_full_queue_is_refused_at_once_and_only_for_that_address(
    connect: Connect, server: Server, turns: Turns
) -> None:
    with trio.fail_after(30):
        async with connect("10.9.9.9") as owner:
            await owner.register("alice", PASSWORD)
        turns.hold = True

        async def login(address: str) -> None:
            async with connect(address) as client:
                await client.login("alice", "wrong")

        async with trio.open_nursery() as waiting:
            waiting.start_soon(login, "10.66.0.1")
            running = await turns.started()  # one runs...
            for _ in range(QUEUE):  # ...and QUEUE wait
                waiting.start_soon(login, "10.66.0.1")
            await settled()
            assert server.accounts.hasher.waiting("10.66.0.1") == QUEUE
            # The next login and register from there are answered without any hash finishing.
            async with connect("10.66.0.1") as client:
                err = await expect_error("rate_limited", client.login("alice", PASSWORD))
                assert "waiting to be checked" in err.message
                await expect_error("rate_limited", client.register("bob", PASSWORD))
            # Another address still queues.
            waiting.start_soon(login, "10.1.1.1")
            await settled()
            assert server.accounts.hasher.waiting("10.1.1.1") == 1
            assert server.accounts.hasher.waiting() == QUEUE + 1
            waiting.cancel_scope.cancel()
        await settled()
        assert server.accounts.hasher.waiting() == 0  # those who hung up took their checks back
        # The check that was running when its client hung up still holds the one thread: a
        # new check waits for it (abandoned checks cannot pile up in the threads' queue).
        async with connect("10.2.2.2") as client, trio.open_nursery() as nursery:
            nursery.start_soon(expect_error, "auth_failed", client.login("alice", "wrong"))
            await settled()
            assert server.accounts.hasher.waiting("10.2.2.2") == 1
            running.set()
            (await turns.started()).set()


def test_the_queue_bound_is_a_server_flag() -> None:
    from p2ppay.cli.main import build_parser, server_options

    argv = ["server", "--hash-queue-per-address", "3"]
    assert server_options(build_parser().parse_args(argv)).config.hash_queue_per_address == 3
    assert server_options(build_parser().parse_args(["server"])).config == ServerConfig()
