"""What issue 12 changed: queued writes, lists from cache, batched reads, and the benchmark's
judgement of what bound a phase (its arithmetic, not its timing)."""

from __future__ import annotations

import math
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from benchmarks import bench, loadgen
from p2ppay import wire as p
from p2ppay.ledger import LedgerUnavailable, Limits, SqliteLedger, open_sqlite_ledger
from p2ppay.pki import Issuer
from p2ppay.presence.local import LocalPresence
from p2ppay.server import Server, ServerConfig, listing
from p2ppay.server.sending import Outgoing
from p2ppay.server.sessions.base import SessionBase

from .conftest import SERVER_NAME, Connect, next_event, pay, registered

# -- queued writes --


class Recorder(trio.abc.SendStream):
    """A stream whose first write waits until the test lets it go; it records every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.release = trio.Event()
        self.broken = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.writes:
            self.writes.append(bytes(data))
            await self.release.wait()
        else:
            self.writes.append(bytes(data))
        if self.broken:
            raise trio.BrokenResourceError("gone")
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_what_is_queued_during_a_write_goes_out_in_order_in_one_write() -> None:
    stream = Recorder()
    out = Outgoing(stream)
    done: list[str] = []
    async with trio.open_nursery() as nursery:

        async def reply(name: str, data: bytes) -> None:
            await out.send(data)
            done.append(name)

        nursery.start_soon(reply, "first", b"reply 1\n")
        await trio.testing.wait_all_tasks_blocked()
        assert out.busy and stream.writes == [b"reply 1\n"]
        # Two events and another reply, queued while the first write is under way: nobody
        # needs to start a write for them (queue() says so), the one under way carries them.
        assert not out.queue(b"event a\n")
        assert not out.queue(b"event b\n")
        nursery.start_soon(reply, "second", b"reply 2\n")
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        stream.release.set()
    assert stream.writes == [b"reply 1\n", b"event a\nevent b\nreply 2\n"]
    assert sorted(done) == ["first", "second"]
    assert not out.busy and out.pending == 0
    # Idle again: the next queue() asks its caller to see that a flush runs.
    assert out.queue(b"event c\n")
    await out.flush()
    assert stream.writes[-1] == b"event c\n"


async def test_a_failed_write_fails_those_waiting_for_it() -> None:
    stream = Recorder()
    stream.broken = True
    out = Outgoing(stream)
    failures: list[str] = []

    async def reply(name: str, data: bytes) -> None:
        try:
            await out.send(data)
        except trio.BrokenResourceError:
            failures.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reply, "first", b"1\n")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reply, "second", b"2\n")
        await trio.testing.wait_all_tasks_blocked()
        stream.release.set()
    assert sorted(failures) == ["first", "second"]
    with pytest.raises(trio.BrokenResourceError):
        await out.send(b"3\n")


async def test_a_payees_events_arrive_in_order(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            for amount in (1, 2, 3, 4, 5):
                await pay(alice, "bob", amount)
            got = [await next_event(bob) for _ in range(5)]
            assert [e.amount for e in got if isinstance(e, p.PaymentReceived)] == [1, 2, 3, 4, 5]
            assert (await bob.list()).balance == 15


# -- lists from cache --


class Member:
    def __init__(self, user: str, ip: str, port: int) -> None:
        self.user: str | None = user
        self.ip = ip
        self.listed_port: int | None = port
        self.replaced_by: list[str] = []

    def replaced(self, by_ip: str) -> None:
        self.replaced_by.append(by_ip)

    def paid(self, transfer: Any) -> None:
        pass

    def told(self, line: bytes) -> None:
        pass

    def push(self, event: object) -> None:
        pass


async def test_presence_generation_moves_on_every_change_and_the_cache_follows() -> None:
    presence = LocalPresence()
    builds = 0

    async def build() -> bytes:
        nonlocal builds
        builds += 1
        return p.encode_json(await presence.listing(10))

    async def online() -> list[str]:
        block = await listing.cached(presence, "list", build)
        return [entry["name"] for entry in msgspec.json.decode(block)]

    a, b, b2 = (
        Member("alice", "10.0.0.1", 1),
        Member("bob", "10.0.0.2", 2),
        Member("Bob", "9.9.9.9", 3),
    )
    g0 = presence.generation
    presence.take_over(a)
    assert presence.generation > g0
    assert await online() == ["alice"] and await online() == ["alice"]
    assert builds == 1  # the second came from cache
    presence.take_over(b)  # login
    assert await online() == ["alice", "bob"]
    presence.take_over(b2)  # takeover: a newer login of the same account
    assert b.replaced_by == ["9.9.9.9"]
    block = await listing.cached(presence, "list", build)
    assert msgspec.json.decode(block)[1] == {"name": "Bob", "ip": "9.9.9.9", "port": 3}
    g = presence.generation
    presence.forget(b)  # the replaced session leaving changes nothing
    assert presence.generation == g
    presence.forget(b2)  # logout
    assert await online() == ["alice"]
    presence.take_over(Member("carol", "10.0.0.3", 4), course=True)  # the other dialect too
    assert presence.generation > g
    assert await online() == ["alice"]
    assert builds == 5  # built again after each change, and only then


async def test_native_list_follows_login_logout_and_takeover(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await registered(alice, "alice", p2p_port=7001)
            assert [u.name for u in (await alice.list()).online] == ["alice"]
            await registered(bob, "bob", p2p_port=7002)
            assert [(u.name, u.port) for u in (await alice.list()).online] == [
                ("alice", 7001),
                ("bob", 7002),
            ]
            async with connect("10.0.0.3") as bob_again:
                await bob_again.login("bob", "correct horse", 7003)
                online = (await alice.list()).online
                assert [(u.name, u.ip, u.port) for u in online] == [
                    ("alice", "10.0.0.1", 7001),
                    ("bob", "10.0.0.3", 7003),
                ]
                await bob_again.logout()
                assert [u.name for u in (await alice.list()).online] == ["alice"]
            await alice.deposit(5)
            listed = await alice.list()
            assert listed.balance == 5  # the balance is never from cache


def test_a_list_result_from_pieces_is_the_same_bytes() -> None:
    online = [p.Presence("alice", "10.0.0.1", 7001), p.Presence("bob", "10.0.0.2", None)]
    conn = p.ServerConnection()
    conn.state = p.State.AUTHENTICATED
    request = p.ListOnline(7)
    whole = conn.send_ok(request, p.ListResult(42, online))
    pieces = conn.send_ok_raw(request, p.list_result_json(42, p.encode_json(online)))
    assert whole == pieces
    conn.state = p.State.AWAIT_HELLO
    with pytest.raises(p.LocalProtocolError):
        conn.send_ok_raw(request, b"{}")


# -- reads in batches --


async def test_reads_waiting_together_are_answered_each(tmp_path: Path) -> None:
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        for i in range(30):
            await ledger.create_account(f"user{i}", None, "course", i)
        got: dict[int, int] = {}

        async def read(i: int) -> None:
            account = await ledger.account(f"user{i}")
            assert account is not None
            got[i] = account.balance

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(read, i)
        assert got == {i: i for i in range(30)}
        assert await ledger.account("nobody") is None


async def test_a_failing_read_fails_only_its_caller(tmp_path: Path) -> None:
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await ledger.create_account("alice", None, "course", 3)

        def bad(db: sqlite3.Connection) -> None:
            db.execute("SELECT nothing FROM nowhere")

        results: list[Any] = []

        async def good() -> None:
            results.append(await ledger.account("alice"))

        async def failing() -> None:
            with pytest.raises(LedgerUnavailable):
                await ledger._read(bad)
            results.append("failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(failing)
            nursery.start_soon(good)
            nursery.start_soon(good)
        assert results.count("failed") == 1
        assert [r.balance for r in results if r != "failed"] == [3, 3]


def test_a_ledger_without_readers_reads_through_the_writer() -> None:
    assert SqliteLedger(":memory:", Limits()).readers == 0


# -- the benchmark's judgement --


def test_only_a_server_near_a_full_core_is_the_bottleneck() -> None:
    assert bench.bottleneck(0.92, 0.30) == "server"
    assert bench.bottleneck(0.85, 0.95) == "server"
    assert bench.bottleneck(0.60, 0.75) == "load generator"
    assert bench.bottleneck(0.60, 0.40) == "neither"


def test_a_phase_not_bound_by_the_server_is_marked_and_its_ratio_not_claimed() -> None:
    echo = bench.summarise(20_000, 1.0, 0.95, [0.3, 0.3, 0.3, 0.3], [0.001] * 100)
    starved = bench.summarise(2_000, 1.0, 0.50, [0.95], [0.01] * 100)
    assert echo["bottleneck"] == "server" and bench.server_bound(echo)
    assert starved["bottleneck"] == "load generator" and not bench.server_bound(starved)
    assert starved["loadgen_max_share"] == pytest.approx(0.95)
    assert echo["loadgen_cpu_share"] == pytest.approx(1.2)
    assert echo["server_cpu_us_per_op"] == pytest.approx(47.5)
    text = bench.report({"baseline_round_trips": echo, "list_round_trips": starved})
    assert "not claimed: not server-bound" in text
    assert "note: list_round_trips was not server-bound" in text
    assert "note: baseline_round_trips" not in text


def test_repeated_runs_give_medians_ranges_and_a_fresh_judgement() -> None:
    runs = [
        {"settlements": {"per_second": v, "server_cpu_share": s, "loadgen_max_share": 0.2,
                         "bottleneck": b}, "mode": "quick"}
        for v, s, b in ((100.0, 0.9, "server"), (300.0, 0.5, "neither"), (200.0, 0.88, "server"))
    ]  # fmt: skip
    median, spread = bench.combine(runs)
    assert median["settlements"]["per_second"] == 200.0
    assert spread["settlements"]["per_second"] == [100.0, 300.0]
    assert median["settlements"]["bottleneck"] == "server"  # from the median shares (0.88)
    assert median["mode"] == "quick"
    assert math.isclose(median["settlements"]["server_cpu_share"], 0.88)


def test_load_is_dealt_to_processes() -> None:
    assert bench.split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert bench.split([1], 4) == [[1]]
    assert bench.loadgen_processes(None, 50) == 4
    assert bench.loadgen_processes(8, 3) == 3


def test_connections_are_split_over_the_nodes_ports() -> None:
    two = {"ports": [7001, 7002]}
    assert [loadgen.port_of(two, i) for i in range(5)] == [7001, 7002, 7001, 7002, 7001]
    assert [loadgen.port_of({"port": 7001}, i) for i in range(3)] == [7001] * 3


def test_the_phases_can_be_chosen() -> None:
    assert list(bench.PHASES)[:2] == ["baseline", "settle"]
    with pytest.raises(SystemExit):
        bench.main(["--phases", "nonsense"])


class FakeHost:
    """Just what SessionBase's writing uses of its server."""

    def __init__(self) -> None:
        self.config = ServerConfig()
        self.spawned: list[Any] = []

    def spawn(self, fn: Any) -> None:
        self.spawned.append(fn)


async def test_an_event_for_a_session_answering_a_request_rides_on_its_reply() -> None:
    host = FakeHost()
    stream = Recorder()
    stream.release.set()
    session = SessionBase(host, stream, "10.0.0.1")  # type: ignore[arg-type]
    session.answering = True
    session.send_soon(b"event 1\n")
    session.send_soon(b"event 2\n")
    assert host.spawned == []  # no delivery task: the reply will carry them
    await session.send(b"reply\n")
    assert stream.writes == [b"event 1\nevent 2\nreply\n"]
    session.answering = False
    session.send_soon(b"event 3\n")  # idle: one delivery task for the burst
    session.send_soon(b"event 4\n")
    assert len(host.spawned) == 1
    await host.spawned[0]()
    assert stream.writes[-1] == b"event 3\nevent 4\n"
    assert session.cancel_scope.deadline == math.inf  # the write deadline was disarmed


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_peer_that_stops_reading_its_replies_is_dropped_at_the_write_deadline(
    idle_jump_clock: trio.testing.MockClock,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reply's write timeout is the session scope's deadline now: still a drop, logged."""
    server = Server(ledger, server_ctx, issuer, ServerConfig(write_timeout=3.0))
    client_side, server_side = trio.testing.lockstep_stream_pair()
    gone = trio.Event()

    async def serve() -> None:
        await server.handle_connection(server_side, "10.5.5.5")
        gone.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_in_memory)
        nursery.start_soon(serve)
        stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
        await stream.do_handshake()
        # A hello, and then not one byte read: the server's reply cannot be written.
        await stream.send_all(p.encode_request(p.Hello(1, 1)))
        started = trio.current_time()
        with trio.fail_after(30):
            await gone.wait()
        assert 3.0 <= trio.current_time() - started < 10
        assert any("stopped reading" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()
