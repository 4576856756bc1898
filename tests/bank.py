"""The bank test harness: many clients paying each other at random, with retries by payment id,
while the server process is SIGKILLed at random moments and restarted on the same state dir.

At the end the ledger itself is audited: every acknowledged payment is in it exactly once and
as acknowledged, nothing is in it that nobody asked for, no balance is negative, and the sum of
balances equals the sum of deposits. Seeded, so a failure can be replayed.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost, ServerError
from p2ppay.client.peer import PeerKey
from p2ppay.ledger import open_ledger
from p2ppay.pki import sign_acceptance
from p2ppay.tls import client_context

from .processes import Proc, spawn

PASSWORD = "bank test password"
DEPOSIT = 1_000


@dataclass
class BankReport:
    acknowledged: dict[uuid.UUID, p.SettleResult] = field(default_factory=dict)
    refused: dict[uuid.UUID, str] = field(default_factory=dict)
    attempted: dict[uuid.UUID, tuple[str, str, int]] = field(default_factory=dict)
    kills: int = 0
    problems: list[str] = field(default_factory=list)


class ServerRunner:
    """Starts, SIGKILLs and restarts one server process on one state dir (``extra``: more
    flags, e.g. ``--ledger URL``)."""

    def __init__(self, state: Path, command: list[str], extra: Sequence[str] = ()) -> None:
        self.state = state
        self.command = command
        self.extra = list(extra)
        self.port = 0
        self.up = trio.Event()
        self.process: trio.Process | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ServerRunner]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.start()
            try:
                yield self
            finally:
                await self.stop(signal.SIGTERM)
                nursery.cancel_scope.cancel()

    async def start(self) -> None:
        cmd = [*self.command, "server", "--host", "127.0.0.1", "--port", "0", "--state-dir",
               str(self.state), "--scrypt-n", "16", *self.extra]  # fmt: skip

        async def run(task_status: trio.TaskStatus[Proc]) -> None:
            async with spawn(cmd, "listening on 127.0.0.1") as proc:
                task_status.started(proc)
                await proc.process.wait()  # until it is stopped or killed

        proc: Proc = await self._nursery.start(run)
        self.process, self.port = proc.process, proc.port
        self.up.set()

    async def stop(self, how: int) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.up = trio.Event()
        process.send_signal(how)
        with trio.fail_after(30):
            await process.wait()

    async def crash_and_restart(self) -> None:
        await self.stop(signal.SIGKILL)
        await self.start()


async def run_bank(
    tmp: Path,
    *,
    seed: int,
    clients: int,
    payments_per_client: int,
    kills: int,
    server_command: list[str] | None = None,
    ledger: str | None = None,
    nodes: int = 1,
) -> BankReport:
    """Run the bank; return what happened (the caller checks it with :func:`audit`).

    With ``nodes`` > 1 (which needs a PostgreSQL ``ledger``), that many servers share the
    ledger and the state dir; client i starts on node i % nodes and, each time its connection
    fails, retries its payment on the next node (so a payment whose answer a crash lost is
    retried on another node, by the same payment id); each crash kills one node, at random."""
    rng = random.Random(seed)
    state = tmp / "state"
    command = server_command or [sys.executable, "-m", "p2ppay"]
    extra = ["--ledger", ledger] if ledger is not None else []
    runners = [ServerRunner(state, command, extra) for _ in range(nodes)]
    report = BankReport()
    names = [f"acct{i:02d}" for i in range(clients)]
    keys = {name: PeerKey() for name in names}
    plans = {
        name: [
            (
                uuid.UUID(int=rng.getrandbits(128), version=4),
                rng.choice([n for n in names if n != name]),
                rng.randint(1, 60),
            )
            for _ in range(payments_per_client)
        ]
        for name in names
    }
    # Crash points, as counts of answered payments: spread over the run, seeded.
    total = clients * payments_per_client
    crash_rng = random.Random(seed + 1)
    crash_at = sorted(crash_rng.sample(range(total // 10, total * 9 // 10), kills))
    answered = [0]
    crash_due = trio.Event()
    # While a node restarts, the payers on the others go on, but only so far: a restart takes
    # seconds, and they would otherwise finish before the next crash is due.
    restarted: list[trio.Event | None] = [None]
    pause_at = [0]

    def one_more_answered() -> None:
        answered[0] += 1
        if crash_at and answered[0] >= crash_at[0]:
            crash_due.set()

    async with AsyncExitStack() as stack:
        for runner in runners:
            await stack.enter_async_context(runner.running())
        ctx = client_context(state / "ca.pem")

        async def setup(i: int, name: str) -> None:
            port = runners[i % nodes].port
            async with Client.connect("127.0.0.1", port, ssl_context=ctx) as client:
                await client.register(name, PASSWORD)
                await client.login(name, PASSWORD, None, keys[name].csr(name))
                await client.deposit(DEPOSIT)

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(names):
                nursery.start_soon(setup, i, name)

        async def pay_all(i: int, name: str) -> None:
            todo = plans[name]
            done = 0
            node = i % nodes
            while done < len(todo):
                runner = runners[node]
                node = (node + 1) % nodes  # the next try goes to the next node
                await runner.up.wait()
                try:
                    async with Client.connect(
                        "127.0.0.1", runner.port, ssl_context=ctx, request_timeout=30
                    ) as client:
                        # With its key, as a wallet does: a login without a CSR would revoke
                        # the key its payers' acceptances are signed with.
                        await client.login(name, PASSWORD, None, keys[name].csr(name))
                        while done < len(todo):
                            waiting = restarted[0]
                            if waiting is not None and answered[0] >= pause_at[0]:
                                await waiting.wait()
                            pid, payee, amount = todo[done]
                            report.attempted[pid] = (name, payee, amount)
                            signature = sign_acceptance(
                                keys[payee].key, str(pid), name, payee, amount
                            )
                            acceptance = base64.b64encode(signature).decode()
                            try:
                                result = await client.settle(pid, payee, amount, acceptance)
                            except ServerError as exc:
                                if exc.code == "internal_error":
                                    break  # not done: the same payment id again, later
                                report.refused[pid] = exc.code
                            except (ConnectionLost, trio.TooSlowError):
                                break  # the server went away: retry this payment id
                            else:
                                report.acknowledged[pid] = result
                            done += 1
                            one_more_answered()
                except* (ConnectionLost, OSError, trio.TooSlowError, trio.BrokenResourceError):
                    pass  # no server yet (or it died during the login): try again
                await trio.sleep(0.02)

        async def killer() -> None:
            nonlocal crash_due
            while crash_at:
                await crash_due.wait()
                crash_at.pop(0)
                crash_due = trio.Event()
                if crash_at and answered[0] >= crash_at[0]:
                    crash_due.set()
                back = restarted[0] = trio.Event()
                pause_at[0] = answered[0] + 2 * clients
                # Whole, even if the payers finish meanwhile: a server left half-started would
                # outlive the test.
                with trio.CancelScope(shield=True):
                    await runners[crash_rng.randrange(nodes)].crash_and_restart()
                report.kills += 1
                restarted[0] = None
                back.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            async with trio.open_nursery() as payers:
                for i, name in enumerate(names):
                    payers.start_soon(pay_all, i, name)
            nursery.cancel_scope.cancel()
    await audit(state, report, names, ledger)
    return report


async def audit(state: Path, report: BankReport, names: list[str], url: str | None = None) -> None:
    """Compare what was acknowledged with what the ledger holds (the SQLite file in ``state``,
    or the PostgreSQL ledger at ``url``); append to report.problems."""
    async with open_ledger(url or state / "ledger.sqlite3") as ledger:
        facts = await ledger.audit()
        stored = {}
        for pid in report.attempted:
            t = await ledger.transfer(pid)
            if t is not None:
                stored[pid] = t
    problems = report.problems
    if facts.total_balances != facts.total_deposits:
        problems.append(f"balances {facts.total_balances} != deposits {facts.total_deposits}")
    if facts.total_deposits != DEPOSIT * len(names):
        problems.append(f"deposits {facts.total_deposits} != {DEPOSIT * len(names)}")
    if facts.min_balance is not None and facts.min_balance < 0:
        problems.append(f"a balance is negative: {facts.min_balance}")
    for pid, result in report.acknowledged.items():
        t = stored.get(pid)
        if t is None:
            problems.append(f"acknowledged payment {pid} is not in the ledger")
        elif (t.payer, t.payee, t.amount, t.payer_balance) != (
            result.payer,
            result.payee,
            result.amount,
            result.balance,
        ):
            problems.append(f"payment {pid} differs from what was acknowledged")
    for pid in report.refused:
        if pid in stored:
            problems.append(f"refused payment {pid} is in the ledger")
    if facts.transfers != len(stored):
        problems.append(f"{facts.transfers} transfers stored, {len(stored)} of them asked for")


BROKEN_LEDGER = """
import sqlite3
import sys
from functools import partial

import trio

from p2ppay import logs
from p2ppay.cli.main import build_parser, server_options
from p2ppay.ledger import connect_sqlite, open_sqlite_ledger
from p2ppay.server import run_server


class AcknowledgesBeforeCommit(sqlite3.Connection):
    \"\"\"A deliberately broken ledger connection: the writer's COMMIT does nothing but on
    every 20th batch, so callers are answered before their batch is durable; a crash then
    loses payments that were already acknowledged.\"\"\"

    batches = 0

    def execute(self, sql, *args):
        if sql == "BEGIN IMMEDIATE" and self.in_transaction:
            return super().execute("SELECT 1")  # still in the batch before, uncommitted
        if sql == "COMMIT":
            type(self).batches += 1
            if type(self).batches % 20:
                return super().execute("SELECT 1")
        return super().execute(sql, *args)


args = build_parser().parse_args(sys.argv[1:])
logs.configure(args.log_level, "text")
broken = partial(
    open_sqlite_ledger,
    connect=partial(connect_sqlite, factory=AcknowledgesBeforeCommit),
    readers=0,  # reads go through the writer, which sees its own uncommitted batches
)
trio.run(partial(run_server, server_options(args), handle_signals=True, open_ledger=broken))
"""


def broken_server_command(tmp: Path) -> list[str]:
    script = tmp / "broken_server.py"
    script.write_text(BROKEN_LEDGER)
    return [sys.executable, str(script)]


def soak_enabled() -> bool:
    return os.environ.get("P2PPAY_SOAK") == "1"
