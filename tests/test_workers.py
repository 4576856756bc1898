"""``server --workers N``: N processes on one port (real CLI processes), and the shared ports."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2ppay import wire as p
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.client.peer import accept_all
from p2ppay.client.wallet import Wallet
from p2ppay.server import ServerOptions
from p2ppay.server.ports import BindError, reserve, reuseport_listeners
from p2ppay.server.workers import worker_command
from p2ppay.tls import client_context

from .processes import Proc, spawn

pytestmark = pytest.mark.slow

PASSWORD = "workers test password"
READY = "all 2 workers listening on 127.0.0.1"


def server_cmd(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
            "--state-dir", str(state), "--scrypt-n", "16", *args]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line the program stopped with (and nothing like a traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("p2ppay")]
    assert len(said) == 1, done.stderr
    return said[0]


def test_more_than_one_worker_needs_a_postgres_ledger(tmp_path: Path) -> None:
    done = run(server_cmd(tmp_path / "state", "--workers", "2"))
    assert done.returncode == ExitCode.USAGE
    assert one_line(done).startswith(
        "p2ppay: --workers 2 needs a PostgreSQL ledger (--ledger postgresql://...)"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_too_many_workers_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    # (Without the cap this spawned workers until the machine gave out: the supervisor would
    # start them one by one, so here the ledger URL points nowhere and the run is bounded.)
    nowhere = "postgresql://p2ppay@127.0.0.1:1/p2ppay_nowhere?connect_timeout=1"
    cmd = server_cmd(tmp_path / "state", "--ledger", nowhere, "--workers", "100000")
    done = run(cmd)
    assert done.returncode == ExitCode.USAGE
    assert one_line(done) == (
        "p2ppay: --workers 100000 is more than 256, the most there may be "
        "(about one per core is what helps)"
    )
    assert "worker 0" not in done.stderr
    assert not (tmp_path / "state").exists()
    assert ServerOptions(ledger=nowhere, workers=256).workers == 256  # the most is allowed


async def test_reserved_port_is_shared_by_reuseport_listeners_and_no_one_else() -> None:
    port, held = reserve(0, "127.0.0.1")
    try:
        assert port != 0
        plain = socket.socket()
        with plain, pytest.raises(OSError, match="in use") as info:
            plain.bind(("127.0.0.1", port))  # a program without SO_REUSEPORT cannot take it
        assert info.value.errno == errno.EADDRINUSE
        first = await reuseport_listeners(port, "127.0.0.1")
        second = await reuseport_listeners(port, "127.0.0.1")
    finally:
        for sock in held:
            sock.close()
    # ...and while workers listen there, another supervisor is told it is in use.
    with pytest.raises(BindError, match=f"127.0.0.1 port {port} is already in use"):
        reserve(port, "127.0.0.1")
    accepted = [0, 0]
    async with trio.open_nursery() as nursery:
        for i, listeners in enumerate((first, second)):

            async def accept(i: int = i, listener: trio.SocketListener = listeners[0]) -> None:
                while True:
                    stream = await listener.accept()
                    accepted[i] += 1
                    await stream.aclose()

            nursery.start_soon(accept)
        with trio.fail_after(10):
            for _ in range(40):  # the kernel spreads them by their source ports
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.receive_some(1)  # EOF once accepted and closed
                await stream.aclose()
        nursery.cancel_scope.cancel()
    for listener in [*first, *second]:
        await listener.aclose()
    assert sum(accepted) == 40 and min(accepted) > 0, accepted


# --------------------------------------------------------------------------------------------
# With PostgreSQL
# --------------------------------------------------------------------------------------------


def worker_pids(proc: Proc) -> list[int]:
    return [
        int(m[1])
        for line in proc.log
        if (m := re.search(r"worker \d+ started \(pid (\d+)\)", line))
    ]


async def gone(pid: int) -> None:
    """Return once process ``pid`` (not our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)  # a pidfd is readable once the process exits
    finally:
        os.close(fd)


async def logged(proc: Proc, pattern: str, after: int = 0) -> re.Match[str]:
    """The first log line from index ``after`` on that matches ``pattern`` (waiting for it:
    the process writes it before it answers, but the pipe may not have been read yet)."""
    with trio.fail_after(15):
        while True:
            for line in proc.log[after:]:
                if found := re.search(pattern, line):
                    return found
            await trio.sleep(0.02)


@asynccontextmanager
async def workers(state: Path, url: str, *args: str) -> AsyncIterator[Proc]:
    async with spawn(server_cmd(state, "--ledger", url, "--workers", "2", *args), READY) as proc:
        yield proc


async def test_two_workers_serve_a_payment_across_them_and_stop_on_sigterm(
    tmp_path: Path, postgres_url: str
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(120):
        async with workers(state, postgres_url) as proc, AsyncExitStack() as stack:
            ctx = client_context(state / "ca.pem")

            async def online(name: str, *, register: bool) -> tuple[Wallet, int]:
                """A wallet logged in as ``name``, and the worker that serves it."""
                wallet = await stack.enter_async_context(
                    Wallet.open(
                        "127.0.0.1", proc.port, ctx, policy=accept_all, listen_host="127.0.0.1"
                    )
                )
                if register:
                    await wallet.register(name, PASSWORD)
                mark = len(proc.log)
                await wallet.login(name, PASSWORD)
                found = await logged(proc, rf"\[worker (\d)\] .*: {name} logged in", mark)
                return wallet, int(found[1])

            alice, alice_at = await online("alice", register=True)
            await alice.deposit(500)
            bob, bob_at = await online("bob", register=True)
            earlier: list[Wallet] = []
            for _ in range(40):  # until bob is on the other worker (each try: 1 in 2)
                if bob_at != alice_at:
                    break
                earlier.append(bob)
                bob, bob_at = await online("bob", register=False)
            assert bob_at != alice_at
            # A take-over reaches the other worker through PostgreSQL a moment after the new
            # login is answered; until then alice's worker still lists the earlier session
            # (docs/scaling.md). Pay once every earlier bob has been told it was replaced.
            with trio.fail_after(15):
                for old in earlier:
                    async for event in old.events:
                        if isinstance(event, p.SessionReplaced):
                            break
            result = await alice.pay("bob", 30)
            assert (result.payer, result.payee, result.amount, result.balance) == (
                "alice", "bob", 30, 470
            )  # fmt: skip
            with trio.fail_after(10):
                async for event in bob.events:
                    if isinstance(event, p.PaymentReceived):
                        assert event.payment_id == result.payment_id and event.amount == 30
                        break
            assert await bob.balance() == 30
            pids = worker_pids(proc)
            assert len(pids) == 2
            proc.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                status = await proc.process.wait()
            for pid in pids:
                await gone(pid)
    assert status == ExitCode.OK, "\n".join(proc.log)
    for i in (0, 1):
        assert any(f"[worker {i}] p2ppay.server: stopped" in line for line in proc.log)
    assert not any("Traceback" in line for line in proc.log)


async def test_a_worker_that_dies_stops_the_others_and_the_supervisor_says_so(
    tmp_path: Path, postgres_url: str
) -> None:
    with trio.fail_after(120):
        async with workers(tmp_path / "state", postgres_url) as proc:
            first, second = worker_pids(proc)
            os.kill(second, signal.SIGKILL)
            status = await proc.process.wait()
            await gone(first)
    assert status == ExitCode.FAILED
    assert proc.log[-1] == "p2ppay server: worker 1 was killed by SIGKILL", proc.log
    assert any("[worker 0] p2ppay.server: stopped" in line for line in proc.log)


async def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, postgres_url: str
) -> None:
    with trio.fail_after(120):
        async with workers(tmp_path / "state", postgres_url) as proc:
            pids = worker_pids(proc)
            proc.process.kill()
            for pid in pids:
                await gone(pid)
            # they left gracefully, not killed along with it
            await logged(proc, r"\[worker 0\] p2ppay\.server: stopped")
            await logged(proc, r"\[worker 1\] p2ppay\.server: stopped")


def test_workers_that_cannot_start_give_one_line(tmp_path: Path, postgres_url: str) -> None:
    nowhere = postgres_url.rsplit("/", 1)[0] + "/p2ppay_no_such_database"
    done = run(server_cmd(tmp_path / "state", "--ledger", nowhere, "--workers", "2"))
    assert done.returncode == ExitCode.FAILED
    line = one_line(done)
    assert re.match(r"p2ppay server: worker \d: ", line), line
    assert "p2ppay_no_such_database" in line


def test_a_port_in_use_is_said_once_before_any_worker_starts(
    tmp_path: Path, postgres_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = server_cmd(tmp_path / "state", "--ledger", postgres_url, "--workers", "2")
        done = run([*cmd, "--port", str(port)])
    assert done.returncode == ExitCode.FAILED
    assert one_line(done) == f"p2ppay server: 127.0.0.1 port {port} is already in use"
    assert "started" not in done.stderr


def test_each_worker_gets_its_own_metrics_port_and_the_shared_ports() -> None:
    options = ServerOptions(
        ledger="postgresql://p2ppay@db/p2ppay", workers=3, port=0, metrics_port=9100
    )
    commands = [worker_command(["server"], options, i, 7, 8700, 8800) for i in range(3)]
    for i, cmd in enumerate(commands):
        assert cmd[3] == "server"  # the supervisor's own flags, then what differs (the last wins)
        assert cmd[cmd.index("--port") + 1] == "8700"  # the port the supervisor resolved
        assert cmd[cmd.index("--course-port") + 1] == "8800"
        assert cmd[cmd.index("--metrics-port") + 1] == str(9100 + i)
        assert cmd[-4:] == ["--worker-index", str(i), "--worker-fd", "7"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"port": 9101}, "--port 9101 is among the workers' metrics ports 9100..9102"),
        ({"metrics_port": 65534}, "--metrics-port 65534 with --workers 3 needs ports up to 65536"),
        ({"ledger": None}, "--workers 3 needs a PostgreSQL ledger"),
    ],
)
def test_worker_settings_that_cannot_work_are_refused(
    given: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {
        "ledger": "postgresql://p2ppay@db/p2ppay",
        "workers": 3,
        "metrics_port": 9100,
    }
    values.update(given)
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerOptions(**values)  # type: ignore[arg-type]
