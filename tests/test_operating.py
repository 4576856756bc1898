"""Operating a server (issue 14), through the real command line with the server running:
the deposit policy, ``p2ppay admin`` beside a live server, metrics and JSON logs."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench import Proc, spawn
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.client.connection import Client
from p2ppay.tls import client_context

from .conftest import acceptance, expect_error, login, pay, registered
from .test_cli_client import client_cmd, json_lines, run_client
from .test_loopback import server_process

pytestmark = pytest.mark.slow


async def run_admin(state: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "p2ppay", "admin", "--state-dir", str(state), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def listening_port(log: list[str], what: str) -> int:
    for line in log:
        if found := re.search(rf"port (\d+) \({what}", line):
            return int(found.group(1))
    raise AssertionError(f"no {what} listener in the log: {log}")


@asynccontextmanager
async def payee_serving(
    port: int, state: Path, name: str, password_file: Path
) -> AsyncIterator[None]:
    """``name``'s client online with ``--accept all -c serve`` until the block ends."""
    cmd = client_cmd(port, state, "--user", name, "--password-file", str(password_file),
                     "--accept", "all", "--json", "-c", "serve")  # fmt: skip
    process = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert process.stdout is not None
    seen = bytearray()
    try:
        with trio.fail_after(30):
            while b'"command": "login"' not in seen:  # online and taking offers
                chunk = await process.stdout.receive_some()
                assert chunk, f"{name}'s client ended: {seen!r}"
                seen += chunk
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                assert process.stdout is not None
                while await process.stdout.receive_some():
                    pass

            nursery.start_soon(drain)
            yield
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def pay_outcome(port: int, state: Path, payer: str, payee: str, amount: int) -> str:
    """Run ``pay`` through the real client; the outcome's code (``ok`` when it worked)."""
    done = await run_client(port, state, "--user", payer, "--json", "-c",
                            f"pay {payee} {amount}", password=f"{payer}'s password")  # fmt: skip
    last = json_lines(done.stdout)[-1]
    assert last["command"] == "pay", done
    assert done.returncode == (0 if last["ok"] else 1), done
    return "ok" if last["ok"] else str(last["error"]["code"])


def accounts(done: subprocess.CompletedProcess[bytes]) -> dict[str, dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json_lines(done.stdout)}


async def test_operator_deposits_refuse_users_and_take_operator_credits(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(120):
        async with server_process(state, "--deposits", "operator", "--course-port", "0") as srv:
            done = await run_client(srv.port, state, "--user", "alice", "--json", "-c",
                                    "register; deposit 5", password="alice's password")  # fmt: skip
            assert done.returncode == 1
            refused = json_lines(done.stdout)[-1]
            assert refused["command"] == "deposit"
            assert refused["error"]["code"] == "deposits_closed"

            credit = await run_admin(state, "credit", "alice", "500", "--reference", "wire-17")
            assert credit.returncode == 0, credit.stderr
            assert b"Credited 500 to alice (reference wire-17). Balance: 500" in credit.stdout
            again = await run_admin(state, "credit", "alice", "500", "--reference", "wire-17")
            assert again.returncode == 0 and b"Already done" in again.stdout
            other = await run_admin(state, "credit", "alice", "7", "--reference", "wire-17")
            assert other.returncode == 1 and b"wire-17" in other.stderr
            assert b"Traceback" not in other.stderr
            done = await run_client(srv.port, state, "--user", "alice", "--json", "-c",
                                    "balance", password="alice's password")  # fmt: skip
            assert json_lines(done.stdout)[-1]["result"] == {"balance": 500}

            # Course accounts start empty under this policy and cannot bring money in.
            course_port = listening_port(srv.log, "course dialect")
            stream = await trio.open_tcp_stream("127.0.0.1", course_port)
            async with stream:
                for line, reply in ((b"REGISTER#carol\n", b"100 OK\n"),
                                    (b"REGISTER#dave#50\n", b"210 FAIL\n")):  # fmt: skip
                    await stream.send_all(line)
                    assert await stream.receive_some() == reply

            listed = accounts(await run_admin(state, "accounts", "--json"))
            assert set(listed) == {"alice", "carol"}
            assert (listed["alice"]["kind"], listed["alice"]["balance"]) == ("native", 500)
            assert (listed["carol"]["kind"], listed["carol"]["balance"]) == ("course", 0)
            assert listed["alice"]["last_login"] is not None and not listed["alice"]["frozen"]
            assert listed["carol"]["created"] is not None
            audit = await run_admin(state, "audit")
            assert audit.returncode == 0, audit.stdout
            table = await run_admin(state, "accounts")
            assert table.stdout.splitlines()[0].split()[:4] == [b"NAME", b"KIND", b"BALANCE",
                                                                b"FROZEN"]  # fmt: skip


async def test_freeze_stops_payments_on_the_running_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "bob.pw").write_text("bob's password\n")
    with trio.fail_after(180):
        async with server_process(state) as srv:
            for name in ("alice", "bob"):
                done = await run_client(srv.port, state, "--user", name, "-c", "register",
                                        password=f"{name}'s password")  # fmt: skip
                assert done.returncode == 0, done.stderr
            assert (await run_admin(state, "credit", "alice", "100")).returncode == 0
            async with payee_serving(srv.port, state, "bob", tmp_path / "bob.pw"):
                assert await pay_outcome(srv.port, state, "alice", "bob", 5) == "ok"
                for frozen in ("bob", "alice"):  # neither pay nor be paid
                    froze = await run_admin(state, "freeze", frozen)
                    assert froze.returncode == 0, froze.stderr
                    assert accounts(await run_admin(state, "accounts", "--json"))[frozen]["frozen"]
                    outcome = await pay_outcome(srv.port, state, "alice", "bob", 5)
                    assert outcome == "account_frozen"
                    assert (await run_admin(state, "unfreeze", frozen)).returncode == 0
                assert await pay_outcome(srv.port, state, "alice", "bob", 7) == "ok"
            listed = accounts(await run_admin(state, "accounts", "--json"))
            assert (listed["alice"]["balance"], listed["bob"]["balance"]) == (88, 12)
            missing = await run_admin(state, "freeze", "nobody")
            assert missing.returncode == 1 and missing.stderr.count(b"\n") == 1


async def test_reset_password_works_and_revokes_the_sessions_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "bob.pw").write_text("bob's password\n")
    (tmp_path / "new.pw").write_text("bob's new password\n")
    (tmp_path / "short.pw").write_text("short\n")
    with trio.fail_after(180):
        async with server_process(state) as srv:
            for name in ("alice", "bob"):
                done = await run_client(srv.port, state, "--user", name, "-c", "register",
                                        password=f"{name}'s password")  # fmt: skip
                assert done.returncode == 0, done.stderr
            assert (await run_admin(state, "credit", "alice", "100")).returncode == 0
            async with payee_serving(srv.port, state, "bob", tmp_path / "bob.pw"):
                assert await pay_outcome(srv.port, state, "alice", "bob", 5) == "ok"
                short = await run_admin(state, "reset-password", "bob", "--password-file",
                                        str(tmp_path / "short.pw"))  # fmt: skip
                assert short.returncode == 2, short.stderr
                reset = await run_admin(state, "reset-password", "bob", "--password-file",
                                        str(tmp_path / "new.pw"))  # fmt: skip
                assert reset.returncode == 0, reset.stderr
                # bob's running client still signs with its session's key: no longer counted.
                assert await pay_outcome(srv.port, state, "alice", "bob", 5) == "bad_acceptance"
            old = await run_client(srv.port, state, "--user", "bob", "--json", "-c", "balance",
                                   password="bob's password")  # fmt: skip
            assert old.returncode == 1
            assert json_lines(old.stdout)[-1]["error"]["code"] == "auth_failed"
            new = await run_client(srv.port, state, "--user", "bob", "--json", "-c", "balance",
                                   password="bob's new password")  # fmt: skip
            assert new.returncode == 0, new.stderr
            assert json_lines(new.stdout)[-1]["result"] == {"balance": 5}
            unknown = await run_admin(state, "reset-password", "nobody", "--password-file",
                                      str(tmp_path / "new.pw"))  # fmt: skip
            assert unknown.returncode == 1 and b"no account" in unknown.stderr


async def test_audit_passes_a_sound_ledger_and_fails_a_corrupted_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(120):
        async with server_process(state) as srv:
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as bob,
            ):
                await registered(alice, "alice", deposit=100)
                await registered(bob, "bob")
                for amount in (1, 2, 3):
                    await pay(alice, "bob", amount)
            assert (await run_admin(state, "debit", "alice", "4")).returncode == 0
            sound = await run_admin(state, "audit")
            assert sound.returncode == 0, sound.stdout
            assert b"The ledger is sound." in sound.stdout and b"FAIL" not in sound.stdout
            # Behind the ledger's back (as a stray UPDATE or a bad restore would): money from
            # nowhere, while the server runs.
            db = sqlite3.connect(state / "ledger.sqlite3", timeout=10)
            with db:
                db.execute("UPDATE accounts SET balance = balance + 10 WHERE name = 'bob'")
            db.close()
            broken = await run_admin(state, "audit")
            assert broken.returncode == 1
            failed = [line for line in broken.stdout.splitlines() if line.startswith(b"FAIL")]
            assert [line.split(b":")[0] for line in failed] == [
                b"FAIL  conservation",
                b"FAIL  balances match movements",
            ]
            assert b"bob: balance 16, movements say 6" in broken.stdout
            assert broken.stderr.startswith(b"p2ppay admin: the audit failed")


async def test_backup_under_payment_load_is_sound(tmp_path: Path) -> None:
    state = tmp_path / "state"
    copies = [tmp_path / f"copy{i}" / "ledger.sqlite3" for i in range(3)]
    paid = 0
    with trio.fail_after(120):
        async with server_process(state) as srv:
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as bob,
            ):
                await registered(alice, "alice", deposit=100_000)
                await registered(bob, "bob", deposit=100_000)
                stop = trio.Event()

                async def keep_paying(payer: Client, payee: str) -> None:
                    nonlocal paid
                    while not stop.is_set():
                        await pay(payer, payee, 1)
                        paid += 1

                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(keep_paying, alice, "bob")
                        nursery.start_soon(keep_paying, bob, "alice")
                    for copy in copies:
                        copy.parent.mkdir()
                        done = await run_admin(state, "backup", str(copy))
                        assert done.returncode == 0, done.stderr
                    stop.set()
                again = await run_admin(state, "backup", str(copies[0]))
                assert again.returncode == 1 and b"exists" in again.stderr
    assert paid > 0
    counts = []
    for copy in copies:
        db = sqlite3.connect(copy)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            counts.append(db.execute("SELECT COUNT(*) FROM movements").fetchone()[0])
        finally:
            db.close()
        audit = await run_admin(copy.parent, "audit")
        assert audit.returncode == 0, audit.stdout
    assert counts == sorted(counts) and counts[-1] > counts[0], counts  # taken under load
    exported = await run_admin(state, "export", "--csv")
    assert exported.returncode == 0
    rows = exported.stdout.decode().splitlines()
    assert rows[0].startswith("seq,at,kind,payer,payee,amount")
    assert len(rows) == 1 + 2 + paid  # the header, two deposits, every payment


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """One HTTP/1.0 GET: (status line, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head.decode().splitlines()[0], body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@asynccontextmanager
async def server_with_metrics(state: Path, *args: str) -> AsyncIterator[Proc]:
    """Like ``server_process``, but its ``port`` is the metrics listener's."""
    cmd = [sys.executable, "-m", "p2ppay", "server", "--host", "127.0.0.1", "--port", "0",
           "--scrypt-n", "16", "--state-dir", str(state), "--metrics-port", "0", *args]  # fmt: skip
    async with spawn(cmd, "(metrics", env=dict(os.environ)) as proc:
        yield proc


async def test_metrics_count_a_payment_and_json_logs_parse(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(120):
        async with server_with_metrics(
            state, "--log-format", "json", "--log-level", "debug"
        ) as srv:
            port = listening_port(srv.log, "TLS")
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", port, ssl_context=ctx) as bob,
                Client.connect("127.0.0.1", port, ssl_context=ctx) as mallory,
            ):
                await registered(alice, "alice", deposit=100)
                await registered(bob, "bob")
                before = samples((await scrape(srv.port))[1])
                assert before[("p2ppay_settles_total", (("outcome", "ok"),))] == 0
                payment = await pay(alice, "bob", 30)
                await expect_error("auth_failed", login(mallory, "alice", "not alice's password"))
                status, text = await scrape(srv.port)
                assert status == "HTTP/1.0 200 OK"
                after = samples(text)
                assert after[("p2ppay_settles_total", (("outcome", "ok"),))] == 1
                assert after[("p2ppay_settle_seconds_count", ())] == 1
                assert after[("p2ppay_sessions_logged_in", (("dialect", "native"),))] == 2
                assert after[("p2ppay_connections_open", ())] >= 3
                assert after[("p2ppay_login_failures_total", ())] == 1
                commits = after[("p2ppay_ledger_batch_operations_count", ())]
                assert commits >= 5 and after[("p2ppay_ledger_commit_seconds_count", ())] == commits
                assert (await scrape(srv.port, "/other"))[0] == "HTTP/1.0 404 Not Found"
            srv.process.send_signal(signal.SIGTERM)
            assert await srv.process.wait() == 0
    records = [json.loads(line) for line in srv.log]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    settled = [r for r in records if r.get("payment_id") == str(payment.payment_id)]
    assert settled and settled[0]["user"] == "alice" and settled[0]["peer"] == "127.0.0.1"
    assert any(r["message"] == "stopped" for r in records)
    assert isinstance(payment.payment_id, uuid.UUID)


async def test_a_server_that_cannot_start_says_why_in_json_too(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with trio.fail_after(60):
            done = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "p2ppay",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--state-dir",
                    str(tmp_path),
                    "--port",
                    "0",
                    "--metrics-port",
                    str(port),
                    "--log-format",
                    "json",
                ],
                capture_stderr=True,
                check=False,
            )
    finally:
        await listeners[0].aclose()
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.decode().splitlines()]
    assert records[-1]["level"] == "ERROR"
    assert records[-1]["message"] == f"p2ppay server: 127.0.0.1 port {port} is already in use"


async def test_freeze_stops_a_payment_already_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with trio.fail_after(120):
        async with server_process(state) as srv:
            ctx = client_context(state / "ca.pem")
            async with (
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as alice,
                Client.connect("127.0.0.1", srv.port, ssl_context=ctx) as bob,
            ):
                await registered(alice, "alice", deposit=100)
                await registered(bob, "bob")
                # bob has accepted (signed) the payment; the freeze comes before it settles.
                pid = uuid.uuid4()
                signed = acceptance(pid, "alice", "bob", 5)
                assert (await run_admin(state, "freeze", "bob")).returncode == 0
                await expect_error("account_frozen", alice.settle(pid, "bob", 5, signed))
                assert (await alice.list()).balance == 100
                assert (await run_admin(state, "unfreeze", "bob")).returncode == 0
                # The refusal stored nothing: the same payment settles now, once.
                assert (await alice.settle(pid, "bob", 5, signed)).balance == 95


async def test_an_export_whose_reader_stops_early_ends_quietly(tmp_path: Path) -> None:
    """``p2ppay admin export | head``: the reader goes away; no traceback, no error."""
    from p2ppay.ledger import open_ledger

    state = tmp_path / "state"
    state.mkdir()
    async with open_ledger(state / "ledger.sqlite3") as ledger:
        await ledger.create_account("ann", None, "course", 0)
        async with trio.open_nursery() as nursery:
            for _ in range(1000):  # ~250 KB of JSON lines: more than a pipe holds
                nursery.start_soon(ledger.deposit, "ann", 1)
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "p2ppay", "admin", "--state-dir", str(state), "export"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None
        first = await process.stdout.receive_some(4096)
        assert first.startswith(b'{"seq": 1,')
        await process.stdout.aclose()  # like head, having read enough
        errors = b""
        while chunk := await process.stderr.receive_some():
            errors += chunk
        status = await process.wait()
    assert (status, errors) == (ExitCode.OUTPUT_CLOSED, b"")


@pytest.mark.parametrize(("flags", "ttl"), [((), 0.5), (("--balance-cache-ttl", "0"), 0.0)])
async def test_the_balance_cache_ttl_reaches_the_ledger(
    tmp_path: Path, flags: tuple[str, ...], ttl: float
) -> None:
    from functools import partial

    from p2ppay import ledger as lg
    from p2ppay.cli.main import build_parser, server_options
    from p2ppay.server import run_server

    opened: list[float] = []

    def open_ledger(target: Any, limits: Any, **kwargs: Any) -> Any:
        opened.append(kwargs["balance_ttl"])
        return lg.open_ledger(target, limits, **kwargs)

    argv = ["server", "--state-dir", str(tmp_path / "state"), "--port", "0", *flags]
    options = server_options(build_parser().parse_args(argv))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_server, options, open_ledger=open_ledger))
            nursery.cancel_scope.cancel()
    assert opened == [ttl]
