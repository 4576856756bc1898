"""The benchmark: p2ppay's figures next to a baseline measured in the same run.

``python -m p2ppay.bench [--full] [--out DIR]`` (or ``nox -s bench``). The servers run as
separate processes (p2ppay's own CLI, and a minimal Trio TLS line-echo server as the baseline);
this process is the load generator, and says so when it was the bottleneck. Results are
printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
import trio.lowlevel

from . import protocol as p
from .client import Client, ServerError
from .peer import PeerKey, accept_all
from .pki import ensure_server_credentials, sign_acceptance
from .tls import client_context, server_context
from .wallet import Wallet

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
CLIENTS: Final = 50
PASSWORD: Final = "benchmark password"
#: The wrong-password storm of issue 9: this many source addresses (127.0.0.0/8 is all
#: loopback on Linux), each with this many connections guessing at once...
STORM_ADDRESSES: Final = 10
STORM_CONNECTIONS: Final = 20
#: ...while one more address, which guesses nothing, logs in with the right password.
QUIET_ADDRESS: Final = "127.0.0.100"


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Window:
    """Counts, latencies and CPU over one measured interval."""

    server_pid: int
    ops: int = 0
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = 0.0
    loadgen_cpu: float = 0.0

    @asynccontextmanager
    async def measuring(self) -> AsyncIterator[Window]:
        cpu0, self_cpu0, t0 = cpu_seconds(self.server_pid), _self_cpu(), time.perf_counter()
        yield self
        self.wall = time.perf_counter() - t0
        self.server_cpu = cpu_seconds(self.server_pid) - cpu0
        self.loadgen_cpu = _self_cpu() - self_cpu0

    def record(self, started: float) -> None:
        self.ops += 1
        self.latencies.append(time.perf_counter() - started)

    def summary(self) -> dict[str, float]:
        rate = self.ops / self.wall if self.wall else 0.0
        return {
            "ops": self.ops,
            "per_second": rate,
            "server_cpu_us_per_op": 1e6 * self.server_cpu / self.ops if self.ops else math.nan,
            "p50_ms": 1e3 * percentile(self.latencies, 0.50),
            "p99_ms": 1e3 * percentile(self.latencies, 0.99),
            "server_cpu_share": self.server_cpu / self.wall if self.wall else 0.0,
            "loadgen_cpu_share": self.loadgen_cpu / self.wall if self.wall else 0.0,
        }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_for(seconds: float, workers: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run ``workers`` copies of ``work(i)`` in a loop for ``seconds``."""
    deadline = trio.current_time() + seconds

    async def loop(i: int) -> None:
        while trio.current_time() < deadline:
            await work(i)

    async with trio.open_nursery() as nursery:
        for i in range(workers):
            nursery.start_soon(loop, i)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclass
class Proc:
    process: trio.Process
    port: int
    log: list[str]


@asynccontextmanager
async def spawn(
    cmd: list[str], marker: str, env: dict[str, str] | None = None
) -> AsyncIterator[Proc]:
    """Start a server process; yield once its log says ``marker ... port N``. Its log is read
    all along (a full pipe would block it); on the way out it gets SIGTERM if still running."""
    process = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, env=env)
    log: list[str] = []
    ready = trio.Event()
    found: list[int] = []

    async def drain() -> None:
        assert process.stderr is not None
        lines = p.LineBuffer(1 << 20)
        while data := await process.stderr.receive_some():
            lines.feed(data)
            while (line := lines.next_line()) is not None:
                text = line.decode(errors="replace")
                log.append(text)
                if marker in text and not found:
                    found.append(int(text.rsplit("port", 1)[1].split()[0]))
                    ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            with trio.fail_after(30):
                await ready.wait()
            try:
                yield Proc(process, found[0], log)
            finally:
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(20):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
    finally:
        with trio.CancelScope(shield=True):
            await process.wait()


def p2ppay_server(state: Path, *extra: str) -> list[str]:
    # The load generator is one address (the guessing storm, ten more): no per-address limits.
    return [
        sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
        "--state-dir", str(state), "--max-connections-per-ip", "20000",
        "--hash-queue-per-address", "20000", "--log-level", "info", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The baseline: a minimal Trio TLS line-echo server
# --------------------------------------------------------------------------------------------


async def serve_echo(state: Path) -> None:
    """Echo each line back (the cheapest server a TLS request/reply protocol can have)."""
    creds = ensure_server_credentials(state)
    ctx = server_context(creds.cert_chain, creds.key)

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        lines = p.LineBuffer()
        try:
            while data := await stream.receive_some(16384):
                lines.feed(data)
                while (line := lines.next_line()) is not None:
                    await stream.send_all(line + b"\n")
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(
        f"echo listening on port {listeners[0].socket.getsockname()[1]}",
        file=sys.stderr,
        flush=True,
    )
    await trio.serve_listeners(handle, listeners)


async def echo_round_trips(port: int, ctx: Any, pid: int, seconds: float) -> dict[str, float]:
    streams = []
    for _ in range(CLIENTS):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        await stream.do_handshake()
        streams.append((stream, p.LineBuffer()))
    message = b'{"id": 1, "op": "list"}\n'
    window = Window(pid)

    async def one(i: int) -> None:
        stream, lines = streams[i]
        started = time.perf_counter()
        await stream.send_all(message)
        while lines.next_line() is None:
            lines.feed(await stream.receive_some())
        window.record(started)

    async with window.measuring():
        await run_for(seconds, CLIENTS, one)
    for stream, _ in streams:
        await trio.aclose_forcefully(stream)
    return window.summary()


async def bare_handshakes(port: int, ctx: Any, pid: int, seconds: float) -> dict[str, float]:
    window = Window(pid)

    async def one(i: int) -> None:
        started = time.perf_counter()
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        await stream.do_handshake()
        window.record(started)
        await trio.aclose_forcefully(stream)

    async with window.measuring():
        await run_for(seconds, 10, one)
    return window.summary()


# --------------------------------------------------------------------------------------------
# p2ppay
# --------------------------------------------------------------------------------------------


@asynccontextmanager
async def logged_in(
    port: int, ctx: Any, names: list[str], *, register: bool, csr: bool
) -> AsyncIterator[list[tuple[Client, PeerKey | None]]]:
    """Clients logged in as ``names`` (registered first if asked), kept open."""
    async with trio.open_nursery() as nursery:
        clients: list[tuple[Client, PeerKey | None]] = []
        done = trio.Event()
        remaining = [len(names)]

        async def hold(name: str) -> None:
            async with Client.connect(
                "127.0.0.1", port, ssl_context=ctx, server_hostname="localhost", request_timeout=120
            ) as client:
                if register:
                    await client.register(name, PASSWORD)
                key = PeerKey() if csr else None
                await client.login(name, PASSWORD, None, key.csr(name) if key else None)
                clients.append((client, key))
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()
                async for _ in client.events:  # payment_received pushes: read and drop
                    pass

        limiter = trio.CapacityLimiter(200)  # how many connect and log in at once

        async def start(name: str) -> None:
            async with limiter:
                nursery.start_soon(hold, name)
                await trio.lowlevel.checkpoint()

        for name in names:
            await start(name)
        with trio.fail_after(600):
            await done.wait()
        clients.sort(key=lambda c: names.index(c[0].user or ""))
        yield clients
        nursery.cancel_scope.cancel()


async def settlements(port: int, ctx: Any, proc: Proc, seconds: float) -> dict[str, float]:
    names = [f"user{i:03d}" for i in range(CLIENTS)]
    async with logged_in(port, ctx, names, register=True, csr=True) as clients:
        for client, _ in clients:
            await client.deposit(1_000_000)
        keys = {name: key for name, (_, key) in zip(names, clients, strict=True)}
        # Sign the acceptances up front: the load generator should not be what is measured.
        rng = __import__("random").Random(42)
        budget = int(seconds * 12_000 / CLIENTS) + 100
        work: list[list[tuple[uuid.UUID, str, str]]] = []
        for i, name in enumerate(names):
            queue = []
            for _ in range(budget):
                payee = names[(i + rng.randrange(1, CLIENTS)) % CLIENTS]
                pid = uuid.uuid4()
                key = keys[payee]
                assert key is not None
                sig = sign_acceptance(key.key, str(pid), name, payee, 1)
                queue.append((pid, payee, base64.b64encode(sig).decode()))
            work.append(queue)
        window = Window(proc.process.pid)

        async def one(i: int) -> None:
            pid, payee, acceptance = work[i].pop()
            started = time.perf_counter()
            await clients[i][0].settle(pid, payee, 1, acceptance)
            window.record(started)

        async with window.measuring():
            await run_for(seconds, CLIENTS, one)
        total = 0
        for c, _ in clients:
            total += (await c.list()).balance
        assert total == CLIENTS * 1_000_000, "money was not conserved"
    return window.summary()


async def login_storm(port: int, ctx: Any, proc: Proc, seconds: float) -> dict[str, Any]:
    names = [f"login{i:03d}" for i in range(60)]
    async with logged_in(port, ctx, names[:5], register=True, csr=False) as watchers:
        async with logged_in(port, ctx, names[5:], register=True, csr=False):
            pass  # registered; logged out again

        async def list_latencies(window: Window) -> None:
            async def one(i: int) -> None:
                started = time.perf_counter()
                await watchers[i][0].list()
                window.record(started)
                await trio.sleep(0.005)

            await run_for(seconds, len(watchers), one)

        idle = Window(proc.process.pid)
        async with idle.measuring():
            await list_latencies(idle)

        logins = Window(proc.process.pid)
        during = Window(proc.process.pid)

        async def login_once(i: int) -> None:
            name = names[5 + (i * 7 + logins.ops) % (len(names) - 5)]
            started = time.perf_counter()
            async with Client.connect(
                "127.0.0.1", port, ssl_context=ctx, server_hostname="localhost"
            ) as client:
                await client.login(name, PASSWORD)
                logins.record(started)

        async with logins.measuring(), trio.open_nursery() as nursery:
            nursery.start_soon(list_latencies, during)
            await run_for(seconds, 10, login_once)

        # The same churn of connections at the same rate, without a password to check: what
        # the storm costs the others besides the hashing (TLS handshakes, session set-up).
        churn = Window(proc.process.pid)
        pace = 10 / max(logins.ops / logins.wall, 1.0)  # seconds per connection per worker
        # Staggered, like the storm's connections (which the hashing queue spreads out).
        start = trio.current_time()
        next_at = [start + i * pace / 10 for i in range(10)]

        async def connect_once(i: int) -> None:
            await trio.sleep_until(next_at[i])
            next_at[i] += pace
            async with Client.connect(
                "127.0.0.1", port, ssl_context=ctx, server_hostname="localhost"
            ):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(list_latencies, churn)
            await run_for(seconds, 10, connect_once)

        storm = await guessing_storm(port, ctx, proc, 2 * seconds, names[5:])
    return {
        "logins": logins.summary(),
        "list_idle": idle.summary(),
        "list_during_storm": during.summary(),
        "list_during_connection_churn": churn.summary(),
        **storm,
    }


@asynccontextmanager
async def connected_from(
    address: str, port: int, ctx: Any, request_timeout: float = 120
) -> AsyncIterator[Client]:
    """A client whose connection comes from ``address`` (a loopback alias)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    async with Client.over(stream, request_timeout=request_timeout) as client:
        yield client


async def guessing_storm(
    port: int, ctx: Any, proc: Proc, seconds: float, targets: list[str]
) -> dict[str, Any]:
    """A quiet address's correct logins (new connection + hello + login), idle and then for
    ``seconds`` while STORM_ADDRESSES x STORM_CONNECTIONS connections guess wrong passwords for
    ``targets``. Quiet means a person's pace, a login a second: an address that logs in again
    at once has just had its turn, and waits for one round of the storming addresses."""
    quiet_name = "quiet"
    async with connected_from(QUIET_ADDRESS, port, ctx) as client:
        await client.register(quiet_name, PASSWORD)

    async def quiet_logins(window: Window, seconds: float, pause: float) -> None:
        async def one(i: int) -> None:
            started = time.perf_counter()
            async with connected_from(QUIET_ADDRESS, port, ctx) as client:
                await client.login(quiet_name, PASSWORD)
            window.record(started)
            await trio.sleep(pause)

        await run_for(seconds, 1, one)

    quiet_idle = Window(proc.process.pid)
    async with quiet_idle.measuring():
        await quiet_logins(quiet_idle, seconds / 4, 0.1)

    answers: dict[str, int] = {}

    async def guess(address: str, k: int) -> None:
        async with connected_from(address, port, ctx) as client:
            n = k
            while True:
                n += 1
                try:
                    await client.login(targets[n % len(targets)], f"wrong {n}")
                except ServerError as exc:
                    answers[exc.code] = answers.get(exc.code, 0) + 1
                    if exc.code != "auth_failed":
                        await trio.sleep(0.01)  # refused at once: do not spin the generator

    quiet = Window(proc.process.pid)
    async with trio.open_nursery() as nursery:
        for a in range(STORM_ADDRESSES):
            for k in range(STORM_CONNECTIONS):
                nursery.start_soon(guess, f"127.0.0.{10 + a}", k * 13)
        await trio.sleep(1)  # let the guesses pile up first
        async with quiet.measuring():
            await quiet_logins(quiet, seconds, 1.0)
        nursery.cancel_scope.cancel()
    return {
        "quiet_login_idle": quiet_idle.summary(),
        "quiet_login": quiet.summary(),
        "guessing_storm": {
            "addresses": STORM_ADDRESSES,
            "connections_per_address": STORM_CONNECTIONS,
            "answers": answers,
        },
    }


async def memory(port: int, ctx: Any, proc: Proc, sessions: int) -> dict[str, float]:
    names = [f"m{i:05d}" for i in range(sessions)]

    # Register in batches over a few connections, then log every one in at once.
    async def register_batch(batch: list[str]) -> None:
        async with Client.connect(
            "127.0.0.1", port, ssl_context=ctx, server_hostname="localhost", request_timeout=120
        ) as client:
            for name in batch:
                await client.register(name, PASSWORD)

    async with trio.open_nursery() as nursery:
        for k in range(20):
            nursery.start_soon(register_batch, names[k::20])
    await trio.sleep(1)
    before = rss_bytes(proc.process.pid)
    started = time.perf_counter()
    async with logged_in(port, ctx, names, register=False, csr=False) as clients:
        took = time.perf_counter() - started
        await trio.sleep(1)
        after = rss_bytes(proc.process.pid)
        listing = await clients[0][0].list()
        assert len(listing.online) == min(sessions, 1000)
    return {
        "sessions": sessions,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kib_per_session": (after - before) / 1024 / sessions,
        "seconds_to_log_in_all": took,
    }


async def peer_to_peer(port: int, ctx: Any, proc: Proc, seconds: float) -> dict[str, float]:
    pairs = 10
    async with trio.open_nursery() as nursery:
        wallets: list[Wallet] = []
        ready = trio.Event()

        async def hold(name: str) -> None:
            async with Wallet.open(
                "127.0.0.1",
                port,
                ctx,
                server_hostname="localhost",
                policy=accept_all,
                listen_host="127.0.0.1",
            ) as wallet:
                await wallet.register(name, PASSWORD)
                await wallet.login(name, PASSWORD)
                await wallet.deposit(1_000_000)
                wallets.append(wallet)
                if len(wallets) == 2 * pairs:
                    ready.set()
                async for _ in wallet.events:  # nobody reads them here; keep the buffer empty
                    pass

        for i in range(2 * pairs):
            nursery.start_soon(hold, f"peer{i:02d}")
        with trio.fail_after(60):
            await ready.wait()
        wallets.sort(key=lambda w: w.user or "")
        payers, payees = wallets[:pairs], wallets[pairs:]
        window = Window(proc.process.pid)

        async def one(i: int) -> None:
            started = time.perf_counter()
            await payers[i].pay(payees[(i + window.ops) % pairs].user or "", 1)
            window.record(started)

        async with window.measuring():
            await run_for(seconds, pairs, one)
        nursery.cancel_scope.cancel()
    return window.summary()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def ledger_stats(log: list[str]) -> dict[str, float]:
    for line in reversed(log):
        if "ledger:" in line and "commits" in line:
            words = line.split("ledger:", 1)[1].split()
            commits, ops = int(words[0]), int(words[2])
            return {
                "commits": commits,
                "operations": ops,
                "operations_per_commit": ops / commits if commits else math.nan,
            }
    return {}


async def run(full: bool, out: Path) -> dict[str, Any]:
    seconds = 15.0 if full else 8.0
    sessions = 10_000 if full else 2_000
    raise_fd_limit()
    results: dict[str, Any] = {
        "mode": "full" if full else "quick",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="p2ppay-bench-") as tmp:
        state = Path(tmp)
        creds = ensure_server_credentials(state)
        ctx = client_context(creds.ca_cert)

        echo_cmd = [sys.executable, "-m", "p2ppay.bench", "--serve-echo", str(state)]
        async with spawn(echo_cmd, "echo listening") as echo:
            results["baseline_round_trips"] = await echo_round_trips(
                echo.port, ctx, echo.process.pid, seconds
            )
            results["baseline_handshakes"] = await bare_handshakes(
                echo.port, ctx, echo.process.pid, seconds / 2
            )

        async with spawn(
            p2ppay_server(state / "settle", "--scrypt-n", "16"), "listening on 127.0.0.1"
        ) as server:
            ctx_s = client_context(state / "settle" / "ca.pem")
            results["settlements"] = await settlements(server.port, ctx_s, server, seconds)
        results["settlements"]["ledger"] = ledger_stats(server.log)

        async with spawn(p2ppay_server(state / "login"), "listening on 127.0.0.1") as server:
            ctx_l = client_context(state / "login" / "ca.pem")
            results["login_storm"] = await login_storm(server.port, ctx_l, server, seconds / 2)

        async with spawn(
            p2ppay_server(state / "memory", "--scrypt-n", "16"), "listening on 127.0.0.1"
        ) as server:
            ctx_m = client_context(state / "memory" / "ca.pem")
            results["memory"] = await memory(server.port, ctx_m, server, sessions)

        async with spawn(
            p2ppay_server(state / "p2p", "--scrypt-n", "16"), "listening on 127.0.0.1"
        ) as server:
            ctx_p = client_context(state / "p2p" / "ca.pem")
            results["peer_to_peer"] = await peer_to_peer(server.port, ctx_p, server, seconds)

    path = trio.Path(out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    await path.parent.mkdir(parents=True, exist_ok=True)
    await path.write_text(json.dumps(results, indent=2, default=float))
    results["written_to"] = str(path)
    return results


def report(r: dict[str, Any]) -> str:
    base, settle = r["baseline_round_trips"], r["settlements"]
    hs, storm, mem, p2p = r["baseline_handshakes"], r["login_storm"], r["memory"], r["peer_to_peer"]
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, baseline: str = "", verdict: str = "") -> None:
        rows.append((name, value, baseline, verdict))

    def flag(ok: bool) -> str:
        return "meets target" if ok else "MISSES target"

    ratio = settle["per_second"] / base["per_second"]
    row("baseline: TLS echo round trips/s (50 conns)", f"{base['per_second']:.0f}")
    row("baseline: server CPU µs per round trip", f"{base['server_cpu_us_per_op']:.0f}")
    row("baseline: p50 / p99 ms", f"{base['p50_ms']:.2f} / {base['p99_ms']:.2f}")
    row(
        "settled payments/s (50 clients)",
        f"{settle['per_second']:.0f}",
        f"ratio {ratio:.2f} (target ≥ 0.70)",
        flag(ratio >= 0.7),
    )
    row(
        "server CPU µs per payment",
        f"{settle['server_cpu_us_per_op']:.0f}",
        f"baseline {base['server_cpu_us_per_op']:.0f} (target ≤ 200)",
        flag(settle["server_cpu_us_per_op"] <= 200),
    )
    row(
        "settle p50 / p99 ms",
        f"{settle['p50_ms']:.2f} / {settle['p99_ms']:.2f}",
        f"baseline {base['p50_ms']:.2f} / {base['p99_ms']:.2f} (p99 target ≤ 25)",
        flag(settle["p99_ms"] <= 25),
    )
    ledger = settle.get("ledger", {})
    if ledger:
        row(
            "payments per commit (whole run)",
            f"{ledger['operations_per_commit']:.1f}",
            f"{ledger['commits']} commits",
        )
    logins = storm["logins"]
    row(
        "logins/s (TLS + hello + login, scrypt 2^14)",
        f"{logins['per_second']:.0f}",
        f"bare TLS handshakes/s {hs['per_second']:.0f}",
        f"ratio {logins['per_second'] / hs['per_second']:.3f}",
    )
    idle99, storm99 = storm["list_idle"]["p99_ms"], storm["list_during_storm"]["p99_ms"]
    row(
        "others' list p99 ms: idle / login storm",
        f"{idle99:.2f} / {storm99:.2f}",
        f"ratio {storm99 / idle99:.2f} (target ≤ 2)",
        flag(storm99 <= 2 * idle99),
    )
    churn99 = storm["list_during_connection_churn"]["p99_ms"]
    row(
        "  same connection churn, no password check",
        f"{churn99:.2f}",
        f"storm / churn {storm99 / churn99:.2f} (what the hashing itself adds)",
    )
    quiet = storm["quiet_login"]
    row(
        f"quiet address's login p99 ms, idle / {STORM_ADDRESSES}x{STORM_CONNECTIONS} guessing",
        f"{storm['quiet_login_idle']['p99_ms']:.0f} / {quiet['p99_ms']:.0f}",
        f"{quiet['ops']} logins (target ≤ 1000)",
        flag(quiet["p99_ms"] <= 1000),
    )
    row(
        f"server RSS per idle session at {mem['sessions']}",
        f"{mem['kib_per_session']:.1f} KiB",
        "target ≤ 32 KiB",
        flag(mem["kib_per_session"] <= 32),
    )
    row(
        "peer-to-peer payments/s (10 payers, accept all)",
        f"{p2p['per_second']:.0f}",
        f"p50 / p99 ms {p2p['p50_ms']:.1f} / {p2p['p99_ms']:.1f}",
    )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(width[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    notes = []
    for name, section in (("baseline", base), ("settlements", settle), ("peer-to-peer", p2p)):
        if section["loadgen_cpu_share"] >= 0.9:
            notes.append(
                f"note: the load generator used {section['loadgen_cpu_share']:.0%} of a "
                f"core during {name}: it may have been the bottleneck there."
            )
    return "\n".join([*lines, *notes, f"results: {r['written_to']}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2ppay.bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="longer runs, 10,000 sessions")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--serve-echo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--phase",
        choices=["all", "scale"],
        default="all",
        help="scale: one node against two on PostgreSQL (p2ppay.benchscale; --ledger URL)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.phase == "scale" or any(a.startswith("--ledger") for a in rest):
        from . import benchscale

        return benchscale.main([*rest, "--out", str(args.out)])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.serve_echo:
        trio.run(serve_echo, args.serve_echo)
        return 0
    results = trio.run(run, args.full, args.out)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
