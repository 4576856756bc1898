"""File descriptors (issue 22.7): a real server process under a low open-file limit fits
--max-connections into it, and a flood of connections costs the log a line, not a traceback
every 0.1 s, while a logged-in user is served throughout; the accept loop's patience itself."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import resource
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from p2ppay.accepting import PatientListener
from p2ppay.client.peer import OfferListener, PeerIdentity, PeerKey, accept_all
from p2ppay.client.wallet import Wallet
from p2ppay.logs import LimitLog
from p2ppay.pki import Issuer
from p2ppay.server.metrics import serve_metrics
from p2ppay.tls import client_context

from .processes import Proc, spawn

pytestmark = pytest.mark.slow

FILES = 256  # `ulimit -n 256`: soft and hard
FLOOD = 300
PASSWORD = "open files test password"


def limited(soft: int = FILES, hard: int = FILES) -> None:
    """In the server's process, before it starts: as under `ulimit -n 256`."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@asynccontextmanager
async def server(
    state: Path, *args: str, limit: Callable[[], None] = limited
) -> AsyncIterator[Proc]:
    cmd = [sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
           "--state-dir", str(state), "--scrypt-n", "16", *args]  # fmt: skip
    async with spawn(cmd, "listening on 127.0.0.1 port", preexec_fn=limit) as proc:
        yield proc


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@asynccontextmanager
async def alice_online(state: Path, proc: Proc) -> AsyncIterator[Wallet]:
    ctx = client_context(state / "ca.pem")
    async with Wallet.open(
        "127.0.0.1", proc.port, ctx, policy=accept_all, listen_host="127.0.0.1"
    ) as wallet:
        await wallet.register("alice", PASSWORD)
        await wallet.login("alice", PASSWORD)
        await wallet.deposit(500)
        yield wallet


async def flood(stack: AsyncExitStack, port: int) -> list[trio.SocketStream]:
    """FLOOD connections that never begin TLS, held open until ``stack`` closes."""
    streams = []
    for _ in range(FLOOD):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stack.push_async_callback(trio.aclose_forcefully, stream)
        streams.append(stream)
    return streams


async def closed_by_server(streams: list[trio.SocketStream], enough: int) -> None:
    """Return once the server has closed ``enough`` of ``streams``."""
    closed = 0
    async with trio.open_nursery() as nursery:

        async def watch(stream: trio.SocketStream) -> None:
            nonlocal closed
            try:
                await stream.receive_some(1)  # (nothing is ever sent: this is EOF)
            except trio.BrokenResourceError:
                pass
            closed += 1
            if closed >= enough:
                nursery.cancel_scope.cancel()

        for stream in streams:
            nursery.start_soon(watch, stream)


def capped(proc: Proc) -> list[str]:
    return [line for line in proc.log if "--max-connections lowered" in line]


async def test_the_server_raises_its_soft_limit_as_far_as_it_needs(tmp_path: Path) -> None:
    # soft 256, hard 4096: 1000 connections and 64 of its own fit once the soft limit is raised
    limit = partial(limited, FILES, 4096)
    with trio.fail_after(30):
        async with server(tmp_path / "state", "--max-connections", "1000", limit=limit) as proc:
            assert open_files(proc.process.pid) == (1000 + 64, 4096)
            assert capped(proc) == []


async def test_under_256_open_files_the_server_caps_its_connections_and_stays_quiet(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with server(state) as proc, alice_online(state, proc) as alice:
            [line] = capped(proc)  # one warning, saying what was capped and why
            assert "--max-connections lowered from 20000 to 192" in line, line
            assert "the open-file limit is 256" in line and "--reserved-fds" in line, line
            mark = len(proc.log)
            async with AsyncExitStack() as held:
                streams = await flood(held, proc.port)
                # The connections past the cap are refused at once (before: none was; they
                # hung in the kernel's queue while accept failed with EMFILE) ...
                await closed_by_server(streams, FLOOD - 192)
                # ... while alice is served as before.
                for _ in range(10):
                    assert await alice.balance() == 500
                flooded = proc.log[mark:]
    assert not any("Traceback" in line for line in proc.log), "\n".join(proc.log)
    assert len(flooded) <= 2, "\n".join(flooded)
    assert any("limit max-connections: 192 open" in line for line in flooded), flooded


async def test_out_of_descriptors_the_accept_loop_waits_and_says_so_once(tmp_path: Path) -> None:
    # Too few kept for the server itself (--reserved-fds 1): the 256 run out before the
    # connection limit is reached, and accept fails with EMFILE for as long as the flood stays.
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with server(state, "--reserved-fds", "1") as proc, alice_online(state, proc) as alice:
            assert "--max-connections lowered from 20000 to 255" in capped(proc)[0]
            mark = len(proc.log)
            async with AsyncExitStack() as held:
                await flood(held, proc.port)
                await proc.log.line_with("limit open-files: cannot accept connections: too many")
                # A second of EMFILE (trio's own loop: ten tracebacks), alice served throughout.
                until = trio.current_time() + 1.0
                while trio.current_time() < until:
                    assert await alice.balance() == 500
                flooded = proc.log[mark:]
    assert not any("Traceback" in line for line in proc.log), "\n".join(proc.log)
    assert len(flooded) <= 2, "\n".join(flooded)


class Flaky(trio.abc.Listener[trio.abc.Stream]):
    """Fails ``accept`` with each of ``errors`` in turn, then hands out a stream (or, if
    ``hang``, waits for ever)."""

    def __init__(self, *errors: int, hang: bool = False) -> None:
        self.errors = list(errors)
        self.hang = hang
        self.hanging = trio.Event()

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, "injected")
        if self.hang:
            self.hanging.set()
            await trio.sleep_forever()
        return trio.testing.memory_stream_pair()[0]

    async def aclose(self) -> None:
        pass


async def test_a_full_file_table_is_waited_out_in_one_line_a_minute(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.accepting")
    many = [errno.EMFILE] * 600 + [errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]  # ~a minute
    listener = PatientListener(Flaky(*many), LimitLog(log, clock=trio.current_time), "advice")
    start = trio.current_time()
    with caplog.at_level(logging.WARNING, "test.accepting"):
        await listener.accept()
    assert 60 <= trio.current_time() - start < 61  # 0.1 s between tries
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "limit open-files: cannot accept connections: too many open files (EMFILE); they wait "
        "until some close (advice)"
    )
    assert len(lines) == 2 and "more since the last report" in lines[1], lines
    assert all(r.exc_info is None for r in caplog.records)  # no traceback
    with pytest.raises(OSError, match="injected"):  # anything else is not waited out
        await PatientListener(Flaky(errno.EBADF), LimitLog(log), "").accept()


async def test_a_payees_listener_waits_out_a_full_file_table_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, issuer: Issuer
) -> None:
    # (trio's serve_listeners alone logged each of these at ERROR, with a traceback.)
    key = PeerKey()
    cert = issuer.issue(key.csr("bob"), "bob", dt.timedelta(hours=1))
    bob = await trio.to_thread.run_sync(PeerIdentity.build, "bob", key, cert.pem, issuer.ca_pem)
    flaky = Flaky(*[errno.EMFILE] * 100, hang=True)  # ten seconds' worth
    with caplog.at_level(logging.INFO):
        async with trio.open_nursery() as nursery:
            await nursery.start(OfferListener(bob, accept_all).serve, [flaky])
            await flaky.hanging.wait()
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("limit open-files: "), lines
    assert all(r.exc_info is None for r in caplog.records)


async def test_the_metrics_listener_waits_out_a_full_file_table_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Flaky(*[errno.EMFILE] * 100, hang=True)  # ten seconds' worth
    limit_log = LimitLog(logging.getLogger("test.metrics"), clock=trio.current_time)
    with caplog.at_level(logging.INFO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_metrics, lambda: b"", [flaky], limit_log)  # type: ignore[arg-type]
            await flaky.hanging.wait()
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("limit open-files: "), lines
    assert all(r.exc_info is None for r in caplog.records)
