"""The benchmark's ``scale`` phase: settlements per second, one node against two, in one run.

``python -m benchmarks.scale --ledger postgresql://...`` (or ``python -m benchmarks.bench
--phase scale --ledger ...``, ``nox -s bench -- --phase scale --ledger ...``). The same settle load
runs against each configuration: 50 users, registered and given a deposit through the first
node, pay each other 1 unit at random, strictly request -> reply, driven by the main
benchmark's load generator processes (:mod:`p2ppay.loadgen`: light ``epoll`` loops, the
acceptances signed before the clock starts; bench.loadgen_processes' default number of
processes, at least 2 users each, since a process pays only users whose keys it holds).
Each process's connections alternate over the nodes' ports, so the users are split evenly over
the nodes, and a payee is often on another node. The load runs WARM_UP seconds uncounted first
(connections, caches, PL/pgSQL's plans). The configurations:

- ``sqlite``: one node on the SQLite ledger (today's default);
- ``postgres``: one node on PostgreSQL;
- ``postgres-2-nodes``: two server processes on two ports, the clients split evenly;
- ``postgres-workers-2``: ``server --workers 2`` (two processes on one port, SO_REUSEPORT).

Each PostgreSQL configuration gets a database of its own, made for the run and dropped after
(or, if the URL's user cannot create databases, the URL's own database, with account names
unique to the run). Measured for each: settles/s, p50/p99, the server processes' CPU per
settle (user + system, all threads, from /proc), PostgreSQL's CPU per settle (its backends for
that database, plus its shared background processes: WAL writer, checkpointer, background
writer, which anything else using the server also feeds), and the load generator processes'
CPU, all over the same counted window. Afterwards the users' balances must still add up to
their deposits. A configuration where the busiest load generator process was near a full core,
or the machine near all its cores, is marked: its figure says more about this machine than
about p2ppay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from benchmarks.bench import (
    CLK_TCK,
    LOADGEN_BUSY_SHARE,
    Meter,
    Proc,
    acceptance_format,
    counter_meter,
    loadgen_processes,
    p2ppay_server,
    percentile,
    raise_fd_limit,
    registered,
    run_loadgens,
    spawn,
    split,
    total_balance,
)
from p2ppay.tls import client_context

CLIENTS: Final = 50
DEPOSIT: Final = 1_000_000
#: the machine counts as the bottleneck from this share of all its cores on (a load generator
#: process, from bench.LOADGEN_BUSY_SHARE of a core)
SATURATED: Final = 0.9
#: cores other programs may use during a run that still counts as quiet
QUIET: Final = 0.2
#: settles/s the pre-signed payments last for (well above what 2 cores reach)
RATE_BUDGET: Final = 8_000
#: seconds of load before each measurement (connections, caches, PL/pgSQL's plans)
WARM_UP: Final = 2.0
#: PostgreSQL's processes that serve no one database (their work is shared)
PG_BACKGROUND: Final = ("walwriter", "checkpointer", "background writer", "autovacuum")


# --------------------------------------------------------------------------------------------
# PostgreSQL: databases for the run, and its processes' CPU
# --------------------------------------------------------------------------------------------


def _dbname(url: str) -> str:
    return str(conninfo_to_dict(url).get("dbname") or "postgres")


def _with_dbname(url: str, dbname: str) -> str:
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{dbname}" + (f"?{tail}" if tail else "")


@contextmanager
def database_for(url: str, label: str) -> Any:
    """A fresh database for one configuration (its URL), dropped afterwards; the URL itself if
    its user may not create databases."""
    name = f"p2ppay_bench_{label.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        yield url
        return
    try:
        yield _with_dbname(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def postgres_cpu(dbname: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL process that serves ``dbname`` or everyone (the
    WAL writer, ...), by pid: found by their command name in /proc."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        ours = f" {dbname} " in title or any(what in title for what in PG_BACKGROUND)
        if ours:
            found[int(entry.name)] = (int(stat[11]) + int(stat[12])) / CLK_TCK
    return found


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two :func:`postgres_cpu` readings (a process that started meanwhile
    counts whole; one that ended meanwhile is lost: the backends live as long as the run)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def postgres_meter(dbname: str) -> Meter:
    """PostgreSQL's CPU for ``dbname`` (see :func:`postgres_cpu`) as a load generator meter."""

    def start() -> Callable[[], float]:
        before = postgres_cpu(dbname)
        return lambda: cpu_between(before, postgres_cpu(dbname))

    return start


def machine_cpu() -> float:
    """CPU seconds every core of the machine has been busy so far (/proc/stat), whoever for."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    label: str
    #: the server processes' ports, one per node (clients are split over them)
    ports: list[int]
    #: every server process (workers included), whose CPU is the server's
    pids: list[int]
    ca: Path
    dbname: str | None = None


@dataclass
class Measured:
    settles: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(
        self,
        wall: float,
        server: float,
        postgres: float | None,
        loadgen: float | Sequence[float],
        machine: float,
    ) -> dict[str, Any]:
        """CPU in seconds over ``wall``; ``loadgen``: each load generator process's (a number:
        one process's)."""
        n = self.settles
        cores = os.cpu_count() or 1
        busy = machine / wall / cores if wall else 0.0
        each = [loadgen] if isinstance(loadgen, (int, float)) else list(loadgen)
        loadgen = sum(each)
        busiest = max(each, default=0.0) / wall if wall else 0.0
        ours = server + (postgres or 0.0) + loadgen
        return {
            "settles": n,
            "per_second": n / wall if wall else 0.0,
            "p50_ms": 1e3 * percentile(self.latencies, 0.50),
            "p99_ms": 1e3 * percentile(self.latencies, 0.99),
            "server_cpu_us_per_settle": 1e6 * server / n if n else None,
            "postgres_cpu_us_per_settle": 1e6 * postgres / n
            if n and postgres is not None
            else None,
            "loadgen_cpu_us_per_settle": 1e6 * loadgen / n if n else None,
            "server_cpu_share": server / wall if wall else 0.0,
            "loadgen_cpu_share": loadgen / wall if wall else 0.0,
            "loadgen_processes": len(each),
            "loadgen_max_share": busiest,
            "machine_busy_share": busy,
            #: what other programs used meanwhile, in cores: a figure taken beside them is low
            "others_cores": max(0.0, machine - ours) / wall if wall else 0.0,
            "loadgen_bound": busiest >= LOADGEN_BUSY_SHARE,
            "machine_bound": busy >= SATURATED,
        }


async def settle_load(setup: Setup, seconds: float, prefix: str) -> dict[str, Any]:
    """Register CLIENTS users and their deposits (through the first node: the ledger is
    shared), then settle for ``seconds`` after WARM_UP from load generator processes, the
    users split over the nodes; then check that the balances still add up."""
    ctx = client_context(setup.ca)
    names = [f"{prefix}{i:03d}" for i in range(CLIENTS)]
    await registered(setup.ports[0], ctx, names, DEPOSIT)
    # Payees are drawn from the same process (which holds their keys): at least 2 users each.
    groups = split(names, loadgen_processes(None, CLIENTS // 2))
    # Enough pre-signed payments for RATE_BUDGET settles/s (a connection that runs out
    # stops, and the result says so).
    budget = int((seconds + WARM_UP) * RATE_BUDGET / CLIENTS) + 100
    ports = setup.ports
    specs = [
        {"phase": "settle", "ca": str(setup.ca), "seconds": seconds, "warmup": WARM_UP,
         "names": group, "budget": budget, "seed": k,
         "acceptance_format": acceptance_format(),
         # each process starts on another node: groups of odd size even out over them
         "ports": ports[k % len(ports) :] + ports[: k % len(ports)]}
        for k, group in enumerate(groups)
    ]  # fmt: skip
    meters = [counter_meter(machine_cpu)]
    if setup.dbname:
        meters.append(postgres_meter(setup.dbname))
    run = await run_loadgens(setup.pids, specs, meters)
    machine, postgres = run.meters[0], (run.meters[1] if setup.dbname else None)
    result = Measured(run.ops, run.latencies).summary(
        run.wall, sum(run.server_cpu.values()), postgres, run.loadgen_cpu, machine
    )
    result["conserved"] = await total_balance(ports[0], ctx, names) == CLIENTS * DEPOSIT
    result["ran_out_of_payments"] = run.ran_out > 0
    return result


def _pids(proc: Proc) -> list[int]:
    """The server process, and the workers it started (``--workers``)."""
    pids = [proc.process.pid]
    for line in proc.log:
        if " started (pid " in line:
            pids.append(int(line.rsplit("(pid ", 1)[1].split(")")[0]))
    return pids


@asynccontextmanager
async def nodes(
    state: Path, label: str, count: int, extra: Sequence[str], marker: str, dbname: str | None
) -> AsyncIterator[Setup]:
    """``count`` server processes on one state directory (they share its PKI)."""
    async with AsyncExitStack() as stack:
        procs = []
        for _ in range(count):
            cmd = p2ppay_server(state, "--scrypt-n", "16", *extra)
            procs.append(await stack.enter_async_context(spawn(cmd, marker)))
        pids = [pid for proc in procs for pid in _pids(proc)]
        yield Setup(label, [proc.port for proc in procs], pids, state / "ca.pem", dbname)


async def run(ledger: str | None, seconds: float, out: Path) -> dict[str, Any]:
    raise_fd_limit()
    tag = uuid.uuid4().hex[:4]
    results: dict[str, Any] = {
        "phase": "scale",
        "seconds": seconds,
        "clients": CLIENTS,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "configurations": {},
    }
    configs: dict[str, Any] = results["configurations"]
    listening = "listening on 127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="p2ppay-scale-") as tmp:
        async with nodes(Path(tmp) / "sqlite", "sqlite", 1, [], listening, None) as setup:
            configs["sqlite"] = await settle_load(setup, seconds, f"s{tag}")
        if ledger is not None:
            plans = [
                ("postgres", "p", 1, [], listening),
                ("postgres-2-nodes", "n", 2, [], listening),
                ("postgres-workers-2", "w", 1, ["--workers", "2"], "all 2 workers listening on"),
            ]
            for label, prefix, count, extra, marker in plans:
                with database_for(ledger, label) as url:
                    state = Path(tmp) / label
                    args = ["--ledger", url, *extra]
                    async with nodes(state, label, count, args, marker, _dbname(url)) as setup:
                        configs[label] = await settle_load(setup, seconds, f"{prefix}{tag}")
    one = configs.get("postgres")
    for label in ("postgres-2-nodes", "postgres-workers-2"):
        if one and label in configs and one["per_second"]:
            configs[label]["speedup_over_one_node"] = (
                configs[label]["per_second"] / one["per_second"]
            )
    path = trio.Path(out) / f"bench-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    await path.parent.mkdir(parents=True, exist_ok=True)
    await path.write_text(json.dumps(results, indent=2))
    results["written_to"] = str(path)
    return results


def report(results: dict[str, Any]) -> str:
    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    head = ("configuration", "settles/s", "p50/p99 ms", "server µs", "postgres µs", "loadgen µs")
    rows = [head]
    notes = []
    for label, r in results["configurations"].items():
        speedup = r.get("speedup_over_one_node")
        rate = f"{r['per_second']:.0f}" + (f" ({speedup:.2f}x)" if speedup else "")
        rows.append(
            (
                label,
                rate,
                f"{r['p50_ms']:.1f}/{r['p99_ms']:.1f}",
                us(r["server_cpu_us_per_settle"]),
                us(r["postgres_cpu_us_per_settle"]),
                us(r["loadgen_cpu_us_per_settle"]),
            )
        )
        if r["loadgen_bound"]:
            notes.append(
                f"note: {label}: the busiest of {r['loadgen_processes']} load generator processes "
                f"used {r['loadgen_max_share']:.0%} of a core: it may have been the bottleneck"
            )
        if r["machine_bound"]:
            notes.append(
                f"note: {label}: all {results['machine']['cpus']} cores were "
                f"{r['machine_busy_share']:.0%} busy (other programs: {r['others_cores']:.2f} "
                "cores): the machine, not p2ppay, was the limit"
            )
        if r["ran_out_of_payments"]:
            notes.append(
                f"note: {label}: clients ran out of pre-signed payments: raise RATE_BUDGET"
            )
        if not r["conserved"]:
            notes.append(f"ERROR: {label}: balances do not add up to the deposits")
    two = results["configurations"].get("postgres-2-nodes")
    if two and "speedup_over_one_node" in two:
        verdict = "meets" if two["speedup_over_one_node"] >= 1.5 else "MISSES"
        others = [r["others_cores"] for r in results["configurations"].values()]
        if max(others) > QUIET:  # then the ratio says as much about them as about p2ppay
            verdict = (
                f"NOT COMPARABLE: other programs used {min(others):.2f}-{max(others):.2f} "
                f"cores meanwhile; run it on a quiet machine; {verdict}"
            )
        notes.append(
            f"2 nodes / 1 node on PostgreSQL: {two['speedup_over_one_node']:.2f}x "
            f"({verdict} the target of 1.5x)"
        )
    width = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(width[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    lines.append("(µs: CPU per settle; postgres: its backends for the run's database + WAL")
    lines.append(" writer, checkpointer, background writer)")
    return "\n".join([*lines, *notes, f"results: {results['written_to']}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchscale", description=__doc__)
    parser.add_argument(
        "--ledger",
        default=None,
        help="a PostgreSQL server (postgresql://...); without it, only the SQLite node runs",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds each")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results = trio.run(run, args.ledger, args.seconds, args.out)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
