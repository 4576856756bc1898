"""The real ``p2ppay client`` for what people expect of payments: a safe retry with ``--id``
after a cut connection, ``status``, history exported whole as CSV, settings from the
environment and a profile, ``--version``, and the interactive shell's help (completion,
history kept across runs, the balance toolbar)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pexpect
import pytest
import trio
import trustme

from p2ppay import __version__
from p2ppay.ledger import AnyLedger, Transfer, open_sqlite_ledger
from p2ppay.passwords import ScryptParams, hash_password

from .test_cli_client import client_cmd, json_lines, run_client
from .test_loopback import server_process

pytestmark = pytest.mark.slow


class CuttingProxy:
    """A TCP relay in front of the server. :meth:`cut` severs every connection through it
    and stops listening, so that clients can reach the server through it no more."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._listener: trio.SocketListener | None = None
        self._streams: list[trio.SocketStream] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (self._listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = self._listener.socket.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    down = await self._listener.accept()
                    nursery.start_soon(self._relay, down)
            except trio.ClosedResourceError:
                pass

    async def _relay(self, down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        self._streams += [down, up]

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some():
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await trio.aclose_forcefully(sink)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, down, up)
            nursery.start_soon(pump, up, down)

    async def cut(self) -> None:
        assert self._listener is not None
        await self._listener.aclose()
        for stream in self._streams:
            await trio.aclose_forcefully(stream)


async def test_a_retry_with_the_same_id_after_a_cut_connection_moves_money_once(
    tmp_path: Path, ledger: AnyLedger, server_port: int, ca: trustme.CA
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    async def client(*args: str, port: int = server_port) -> subprocess.CompletedProcess[bytes]:
        return await run_client(port, tmp_path, "--json", *args, password="the password")

    proxy = CuttingProxy(server_port)
    # The first settlement of alice's commits, then her connection is cut before the reply
    # reaches her, and the server cannot be reached through the proxy any more.
    real_settle = ledger.settle
    settled: list[Transfer] = []

    async def settle_then_cut(*args: Any, **kwargs: Any) -> Transfer:
        transfer = await real_settle(*args, **kwargs)
        if not settled:
            settled.append(transfer)
            await proxy.cut()
        return transfer

    ledger.settle = settle_then_cut  # type: ignore[method-assign]
    with trio.fail_after(120):
        for name, script in (("bob", "register"), ("eve", "register"), ("alice", "register")):
            assert (await client("--user", name, "-c", script)).returncode == 0
        assert (await client("--user", "alice", "-c", "deposit 500")).returncode == 0
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            bob = await trio.lowlevel.open_process(
                [
                    *client_cmd(server_port, tmp_path, "--user", "bob", "--accept", "all"),
                    *("--json", "-c", "serve"),
                ],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, P2PPAY_PASSWORD="the password"),
            )
            bob_out = bytearray()

            async def read_bob(until: bytes) -> None:
                assert bob.stdout is not None
                while until not in bob_out:
                    chunk = await bob.stdout.receive_some()
                    assert chunk, bytes(bob_out)
                    bob_out.extend(chunk)

            await read_bob(b'"command": "login"')
            pid = str(uuid.uuid4())
            cut = await client("--user", "alice", "-c", f"pay bob 30 --id {pid}", port=proxy.port)
            assert cut.returncode == 3, cut
            (failure,) = [x for x in json_lines(cut.stdout) if x.get("command") == "pay"]
            assert failure["error"]["code"] == "server_unreachable"
            assert failure["error"]["payment_id"] == pid
            assert len(settled) == 1 and str(settled[0].payment_id) == pid  # it did settle

            # The same payment again, straight to the server: its first outcome, nothing moves.
            again = await client("--user", "alice", "-c", f"pay bob 30 --id {pid}; balance")
            assert again.returncode == 0, again
            lines = json_lines(again.stdout)
            assert lines[-2] == {
                "command": "pay",
                "ok": True,
                "result": {
                    "payment_id": pid,
                    "payer": "alice",
                    "payee": "bob",
                    "amount": 30,
                    "balance": 470,
                },
            }
            assert lines[-1]["result"] == {"balance": 470}
            # The same id for another payment is refused, and names the id.
            other = await client("--user", "alice", "-c", f"pay bob 31 --id {pid}")
            assert other.returncode == 1
            assert json_lines(other.stdout)[-1]["error"] == {
                "code": "payment_id_conflict",
                "message": f"payment {pid} was settled before as another payment",
                "payment_id": pid,
            }
            # So is the same id with a memo (the memo is part of the payment), before bob is
            # asked anything.
            memo = await client("--user", "alice", "-c", f'pay bob 30 --id {pid} --memo "a; b"')
            assert memo.returncode == 1
            assert json_lines(memo.stdout)[-1]["error"]["code"] == "payment_id_conflict"
            # A payment with a memo (a ";" inside quotes in a -c script) repeated by its id: its
            # first outcome, memo included, and bob is asked once.
            pid2 = str(uuid.uuid4())
            pay2 = f'pay bob 5 --id {pid2} --memo "a; b"'
            twice = await client("--user", "alice", "-c", f"{pay2}; {pay2}")
            assert twice.returncode == 0, twice
            first, second = (x for x in json_lines(twice.stdout) if x.get("command") == "pay")
            assert first == second
            assert (first["result"]["memo"], first["result"]["balance"]) == ("a; b", 465)
            bob.terminate()
            assert bob.stdout is not None
            while chunk := await bob.stdout.receive_some():  # what bob printed till he stopped
                bob_out.extend(chunk)
            await bob.wait()
            nursery.cancel_scope.cancel()
        # asked once for each payment only
        assert bytes(bob_out).count(b'"event": "offer_answered"') == 2

        # status: the payer and the payee see the payment; anyone else, not even that.
        status = [
            json_lines((await client("--user", name, "-c", f"status {pid}")).stdout)[-1]
            for name in ("alice", "bob", "eve")
        ]
        assert status[0]["result"]["settled"] is True
        assert {k: status[0]["result"][k] for k in ("payer", "payee", "amount", "balance")} == {
            "payer": "alice",
            "payee": "bob",
            "amount": 30,
            "balance": 470,
        }
        assert status[1]["result"]["balance"] == 30
        unknown = str(uuid.uuid4())
        nobody = json_lines((await client("--user", "eve", "-c", f"status {unknown}")).stdout)
        assert status[2]["result"] == {**nobody[-1]["result"], "payment_id": pid}
        assert status[2]["result"]["settled"] is False
        plain = await run_client(
            server_port, tmp_path, "--user", "alice", "-c", f"status {pid}", password="the password"
        )
        assert "settled: alice paid bob 30 at " in plain.stdout.decode()


async def _seed(path: Path, payments: int) -> list[str]:
    """A ledger with alice and bob (password "the password") and ``payments`` payments from
    alice to bob; returns the payment ids."""
    digest = hash_password("the password", ScryptParams(n=16, r=8, p=1))
    ids = [uuid.uuid4() for _ in range(payments)]
    async with open_sqlite_ledger(path) as ledger:
        for name in ("alice", "bob", "carol"):
            await ledger.create_account(name, digest)
        await ledger.deposit("alice", 1_000_000)
        await ledger.deposit("carol", 10)
        async with trio.open_nursery() as nursery:  # concurrent: a few group commits
            for i, pid in enumerate(ids):
                nursery.start_soon(ledger.settle, pid, "alice", "bob", 1 + i % 7)
        await ledger.settle(uuid.uuid4(), "carol", "alice", 3, memo='the "book", thanks')
    return [str(pid) for pid in ids]


async def test_a_whole_history_exported_as_csv(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ids = await _seed(state / "ledger.sqlite3", 1234)
    with trio.fail_after(120):
        async with server_process(state) as srv:

            async def alice(script: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
                done = await run_client(
                    srv.port,
                    state,
                    "--user",
                    "alice",
                    *extra,
                    "-c",
                    script,
                    password="the password",
                )
                assert done.returncode == 0, done
                return done

            def rows(done: subprocess.CompletedProcess[bytes]) -> list[dict[str, str]]:
                text = done.stdout.decode()
                return list(
                    csv.DictReader(io.StringIO(text[text.index("time,at_ms") :], newline=""))
                )

            # --out: a file with the CSV only; written whole, through a name of its own.
            exported = tmp_path / "alice history.csv"
            done = await alice(f"history --csv --out '{exported}'")
            assert done.stdout.decode().splitlines()[-1] == f"Wrote 1236 movements to {exported}."
            assert sorted(os.listdir(tmp_path)) == ["alice history.csv", "state"]
            with exported.open(newline="", encoding="utf-8") as f:
                every = list(csv.DictReader(f))
            assert exported.read_bytes().startswith(b"time,at_ms,kind,amount,")
            assert exported.read_bytes().count(b"\r\n") == 1237
            assert rows(await alice("history --csv")) == every  # the same on stdout
            assert len(every) == 1234 + 2  # the payments, carol's, the deposit: no 1,000 cap
            assert [r["kind"] for r in every[-1:]] == ["deposit"]
            assert every[0]["counterparty"] == "carol" and every[0]["kind"] == "received"
            assert every[0]["memo"] == 'the "book", thanks'  # the last column, quoted
            assert {r["memo"] for r in every[1:]} == {""}
            sent = [r for r in every if r["kind"] == "sent"]
            assert sorted(r["payment_id"] for r in sent) == sorted(ids)
            assert [int(r["at_ms"]) for r in every] == sorted(
                (int(r["at_ms"]) for r in every), reverse=True
            )
            # Balances read back add up: each row's balance is the one after it.
            for newer, older in itertools.pairwise(every):
                change = int(newer["amount"]) * (1 if newer["kind"] != "sent" else -1)
                assert int(newer["balance"]) == int(older["balance"]) + change
            assert all(r["time"].endswith("Z") for r in every)

            with_bob = rows(await alice("history --with BOB --limit 1100 --csv"))
            assert with_bob == sent[:1100]
            assert rows(await alice("history --csv --since 2999-01-01")) == []
            assert rows(await alice("history --csv --until 2000-01-01")) == []
            # JSON: a limit beyond a page is fetched page by page too.
            done = await alice("history 1500", "--json")
            result = json_lines(done.stdout)[-1]["result"]
            assert len(result["entries"]) == 1236 and result["next"] is None
            done = await alice("history --limit 1001", "--json")
            result = json_lines(done.stdout)[-1]["result"]
            assert len(result["entries"]) == 1001 and result["next"] is not None
            done = await alice('history --csv --with "carol"', "--json")
            (line,) = [x for x in json_lines(done.stdout) if x.get("command") == "history"]
            assert [r["amount"] for r in csv.DictReader(io.StringIO(line["result"]["csv"]))] == [
                "3"
            ]


async def test_settings_from_the_environment_and_a_profile(
    tmp_path: Path, own_client_settings: Path
) -> None:
    state = tmp_path / "state"
    version = await trio.run_process(
        [sys.executable, "-m", "p2ppay", "client", "--version"], capture_stdout=True
    )
    assert version.stdout.decode().strip() == f"p2ppay {__version__}"

    async def bare(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        """The client with no HOST, PORT or --cafile: from the environment or the profile."""
        with trio.fail_after(60):
            return await trio.run_process(
                [sys.executable, "-m", "p2ppay", "client", *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, P2PPAY_PASSWORD="pat's password", **env),
            )

    await trio.Path(own_client_settings).mkdir(parents=True)
    profile = own_client_settings / "client.toml"
    async with server_process(state) as srv:
        # The profile names the classroom server, its CA (relative to the profile) and the
        # user; a student types only the commands.
        (own_client_settings / "class-ca.pem").write_bytes((state / "ca.pem").read_bytes())
        profile.write_text(
            f'server = "127.0.0.1:{srv.port}"\ncafile = "class-ca.pem"\nuser = "pat"\n'
        )
        done = await bare("--json", "-c", "register; deposit 7")
        assert done.returncode == 0, done
        assert json_lines(done.stdout)[-1]["result"] == {"balance": 7}
        # The environment beats the profile...
        wrong = {"P2PPAY_SERVER": "127.0.0.1:1", "P2PPAY_CAFILE": str(state / "ca.pem")}
        done = await bare("-c", "balance", **wrong)
        assert done.returncode == 3
        assert (
            done.stderr.decode()
            == "p2ppay client: cannot reach 127.0.0.1 port 1: connection refused\n"
        )
        done = await bare("-c", "balance", P2PPAY_USER="nobody")
        assert done.returncode == 1 and b"auth_failed" in done.stdout
        # ...and the flags beat the environment.
        done = await bare("127.0.0.1", str(srv.port), "--user", "pat", "-c", "balance", **wrong)
        assert done.returncode == 0, done
        assert done.stdout.decode().splitlines()[-1] == "Balance: 7"
    # A profile that cannot be used: one line naming it, exit 2.
    profile.write_text('server = "127.0.0.1\n')
    done = await bare("-c", "balance")
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith(f"p2ppay client: {profile}: not valid TOML")
    await trio.Path(profile).unlink()
    done = await bare("-c", "balance", P2PPAY_SERVER="[::1")
    assert done.returncode == 2 and done.stderr.startswith(b"p2ppay client: P2PPAY_SERVER:")


@asynccontextmanager
async def interactive(cmd: list[str], env: dict[str, str]) -> AsyncIterator[pexpect.spawn[str]]:
    shell = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30)
    try:
        yield shell
    finally:
        shell.close(force=True)


async def test_the_interactive_shell_completes_remembers_and_shows_the_balance(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    # The toolbar is drawn only once prompt_toolkit knows where the cursor is: this terminal
    # answers its cursor position requests (CPR), as a real one does.
    env = dict(os.environ, TERM="xterm")
    history = Path(env["XDG_STATE_HOME"]) / "p2ppay" / "client-history"

    def run(shell: pexpect.spawn[str], *steps: tuple[str, str]) -> None:
        for send, expect in steps:
            shell.send(send)
            while expect and shell.expect_exact([expect, "\x1b[6n"]) == 1:
                shell.send("\x1b[1;1R")

    async with server_process(state) as srv:
        cmd = client_cmd(srv.port, state, "--listen-port", "0")
        async with interactive(cmd, env) as shell:
            await trio.to_thread.run_sync(
                run,
                shell,
                ("", "p2ppay>"),
                ("register quinn\r", "password:"),
                ("a secret password\r", "again:"),
                ("a secret password\r", "Registered quinn"),
                ("login quinn\r", "password:"),
                ("a secret password\r", "Logged in as quinn"),
                ("", "quinn  balance: 0"),  # the toolbar
                ("dep\t", "osit"),  # Tab completes the command
                (" 25\r", "Balance: 25"),
                ("", "quinn  balance: 25"),
                ("list\r", "Online (1)"),
                ("history --w\t", "ith"),  # an option
                (" qu\t", "inn"),  # and a name from the last list
                ("\r", "No movements yet."),
                ("exit\r", ""),
            )
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
        assert stat.S_IMODE(history.stat().st_mode) == 0o600
        kept = history.read_text()
        assert "deposit 25" in kept and "history --with quinn" in kept
        assert "secret" not in kept  # passwords are never kept
        # The next run has the commands of the last: Up brings back the latest.
        async with interactive(cmd, env) as shell:
            await trio.to_thread.run_sync(
                run, shell, ("", "p2ppay>"), ("\x1b[A", "exit"), ("\r", "")
            )
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
