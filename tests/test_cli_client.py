"""The real ``p2ppay client`` command: scripted (subprocess) and interactive (pseudo-terminal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest
import trio

from p2ppay.cli.exitcodes import ExitCode
from p2ppay.client.connection import Client
from p2ppay.tls import client_context

from .test_loopback import server_process

pytestmark = pytest.mark.slow


def client_cmd(port: int, state: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "p2ppay",
        "client",
        "127.0.0.1",
        str(port),
        "--cafile",
        str(state / "ca.pem"),
        "--server-name",
        "localhost",
        *args,
    ]


async def run_client(
    port: int, state: Path, *args: str, password: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    if password is not None:
        env["P2PPAY_PASSWORD"] = password
    with trio.fail_after(60):
        return await trio.run_process(
            client_cmd(port, state, *args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )


def json_lines(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines() if line.strip()]


async def test_scripted_payer_and_unattended_payee(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "bob.pw").write_text("bob's password\n")
    with trio.fail_after(120):
        async with server_process(state) as srv:
            done = await run_client(
                srv.port,
                state,
                "--user",
                "bob",
                "--password-file",
                str(tmp_path / "bob.pw"),
                "-c",
                "register",
            )
            assert done.returncode == 0, done.stderr
            done = await run_client(
                srv.port,
                state,
                "--user",
                "alice",
                "--json",
                "-c",
                "register; deposit 500",
                password="alice's password",
            )
            assert done.returncode == 0, done.stderr
            assert json_lines(done.stdout)[-1] == {
                "command": "deposit",
                "ok": True,
                "result": {"balance": 500},
            }

            async with trio.open_nursery() as nursery:
                bob = await trio.lowlevel.open_process(
                    client_cmd(
                        srv.port,
                        state,
                        "--user",
                        "bob",
                        "--password-file",
                        str(tmp_path / "bob.pw"),
                        "--accept",
                        "all",
                        "--json",
                        "-c",
                        "serve",
                    ),
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                )
                assert bob.stdout is not None
                bob_out = bytearray()

                async def wait_for_bob(text: bytes) -> None:
                    assert bob.stdout is not None
                    while text not in bob_out:
                        chunk = await bob.stdout.receive_some()
                        assert chunk, f"bob's client ended: {bob_out!r}"
                        bob_out.extend(chunk)

                await wait_for_bob(b'"command": "login"')  # online and taking offers

                paid = await run_client(
                    srv.port,
                    state,
                    "--user",
                    "alice",
                    "--json",
                    "-c",
                    "pay bob 120; pay bob 30; balance",
                    password="alice's password",
                )
                assert paid.returncode == 0, paid.stderr
                lines = json_lines(paid.stdout)
                pays = [line for line in lines if line["command"] == "pay"]
                assert [(x["ok"], x["result"]["amount"], x["result"]["balance"]) for x in pays] == [
                    (True, 120, 380),
                    (True, 30, 350),
                ]
                assert lines[-1] == {"command": "balance", "ok": True, "result": {"balance": 350}}

                failed = await run_client(
                    srv.port,
                    state,
                    "--user",
                    "alice",
                    "--json",
                    "-c",
                    "pay bob 100000",
                    password="alice's password",
                )
                assert failed.returncode == 1
                assert json_lines(failed.stdout)[-1]["error"]["code"] == "insufficient_funds"

                await wait_for_bob(b'"balance": 150')  # bob's client saw both settlements
                bob.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    assert await bob.wait() == 0
                nursery.cancel_scope.cancel()

            events = [x for x in json_lines(bytes(bob_out)) if x.get("event") == "payment_received"]
            assert [(e["payer"], e["amount"], e["balance"]) for e in events] == [
                ("alice", 120, 120),
                ("alice", 30, 150),
            ]
            done = await run_client(
                srv.port,
                state,
                "--user",
                "bob",
                "--json",
                "-c",
                "balance",
                "--password-file",
                str(tmp_path / "bob.pw"),
            )
            assert json_lines(done.stdout)[-1]["result"] == {"balance": 150}


async def test_client_errors_are_explained(tmp_path: Path) -> None:
    """Usage errors exit 2, failed commands 1, an unreachable server 3: one line each."""
    state = tmp_path / "state"
    with trio.fail_after(60):
        done = await run_client(1, tmp_path / "nowhere", "-c", "list")
        assert done.returncode == 2
        assert b"--cafile" in done.stderr
        async with server_process(state) as srv:
            done = await run_client(srv.port, state, "-c", "list")
            assert done.returncode == 2
            assert b"log in first" in done.stdout
            for script in ("register", "balance"):
                done = await run_client(srv.port, state, "--user", "zed", "-c", script)
                assert done.returncode == 2
                assert b"no password: use --password-file" in done.stdout, script
            done = await run_client(
                srv.port,
                state,
                "--user",
                "zed",
                "-c",
                "register; deposit 1.5",
                password="zed password",
            )
            assert done.returncode == 2
            assert b"positive whole number" in done.stdout
            done = await run_client(
                srv.port, state, "--user", "zed", "-c", "frobnicate", password="zed password"
            )
            assert done.returncode == 2
            assert b"unknown command" in done.stdout
            for script, complaint in (
                ("pay bob 5 --anything", b"does not take '--anything'"),
                ("balance now", b"does not take 'now'"),
                ("history abc", b"number of movements must be a whole number from 1 to"),
                ("history 0", b"number of movements"),
                ("history --since yesterday", b"--since takes a date"),
                ("pay bob 5 --id 42", b"'42' is not a payment id"),
                ("pay bob 5 --id", b"--id needs a value"),
                ('pay "bob 5', b"a quote is not closed"),
            ):
                done = await run_client(
                    srv.port, state, "--user", "zed", "-c", script, password="zed password"
                )
                assert done.returncode == 2, script
                assert complaint in done.stdout, (script, done.stdout)
                assert b"Offering" not in done.stdout
            # A command the server refuses: exit 1.
            done = await run_client(
                srv.port, state, "--user", "zed", "-c", "pay zed 1", password="zed password"
            )
            assert done.returncode == 1
            assert done.stdout.decode().splitlines() == [
                "Logged in as zed. Balance: 0. Taking payments on port "
                + done.stdout.decode().split("port ")[1].split(".")[0]
                + ".",
                "Error (self_payment): you cannot pay yourself",
            ]
            port = srv.port
        # The server is gone: exit 3, one line on stderr, also with --json.
        for extra in ((), ("--json",)):
            done = await run_client(port, state, *extra, "-c", "list")
            assert done.returncode == 3, done
            assert done.stderr.decode().splitlines() == [
                f"p2ppay client: cannot reach 127.0.0.1 port {port}: connection refused"
            ]
            if extra:
                assert json_lines(done.stdout) == [
                    {
                        "command": "connect",
                        "ok": False,
                        "error": {
                            "code": "server_unreachable",
                            "message": f"cannot reach 127.0.0.1 port {port}: connection refused",
                        },
                    }
                ]


def test_interactive_shell_in_a_pseudo_terminal(tmp_path: Path) -> None:
    """register, deposit, list, an offer answered at the prompt, a pay, and exit."""
    trio.run(_interactive, tmp_path)


async def _interactive(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "bob.pw").write_text("bob's password\n")
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="120")
    env.pop("P2PPAY_PASSWORD", None)
    async with server_process(state) as srv:
        bob_args = ["--user", "bob", "--password-file", str(tmp_path / "bob.pw"), "--accept", "all"]
        done = await run_client(srv.port, state, *bob_args, "-c", "register")
        assert done.returncode == 0, done.stderr
        done = await run_client(
            srv.port,
            state,
            "--user",
            "carol",
            "-c",
            "register; deposit 100",
            password="carol's password",
        )
        assert done.returncode == 0, done.stderr
        bob = await trio.lowlevel.open_process(
            client_cmd(srv.port, state, *bob_args, "--json", "-c", "serve"),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

        cmd = client_cmd(srv.port, state)
        shell = pexpect.spawn(
            cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30, dimensions=(40, 120)
        )
        try:

            def answer(expected: str, reply: str) -> None:
                # prompt_toolkit draws a prompt's trailing space as a cursor move
                shell.expect_exact(expected.rstrip())
                shell.sendline(reply)

            await trio.to_thread.run_sync(shell.expect_exact, "p2ppay>")
            shell.sendline("1")  # the seed program's menu: register
            await trio.to_thread.run_sync(answer, "name: ", "alice")
            await trio.to_thread.run_sync(answer, "password: ", "alice's password")
            await trio.to_thread.run_sync(answer, "again: ", "alice's password")
            await trio.to_thread.run_sync(shell.expect_exact, "Registered alice")
            shell.sendline("login alice")
            await trio.to_thread.run_sync(answer, "password: ", "alice's password")
            await trio.to_thread.run_sync(answer, "(Enter: any free port): ", "80")
            await trio.to_thread.run_sync(answer, "from 1024 to 65535", "")  # re-asked
            await trio.to_thread.run_sync(shell.expect_exact, "Logged in as alice")
            await trio.to_thread.run_sync(answer, "alice> ", "deposit lots")
            await trio.to_thread.run_sync(answer, "positive whole number", "deposit 50")
            await trio.to_thread.run_sync(shell.expect_exact, "Balance: 50")
            shell.sendline("list")
            await trio.to_thread.run_sync(shell.expect, r"alice\s+127\.0\.0\.1")
            await trio.to_thread.run_sync(shell.expect, r"bob\s+127\.0\.0\.1")

            # carol pays alice while she sits at her prompt, half-way through typing.
            await trio.to_thread.run_sync(shell.expect_exact, "alice>")
            shell.send("hist")
            # Only once the shell has echoed it is it typed (and not still in the pty).
            await trio.to_thread.run_sync(shell.expect_exact, "hist")
            async with trio.open_nursery() as nursery:
                result: list[subprocess.CompletedProcess[bytes]] = []

                async def pay_alice() -> None:
                    result.append(
                        await run_client(
                            srv.port,
                            state,
                            "--user",
                            "carol",
                            "--json",
                            "-c",
                            "pay alice 30",
                            password="carol's password",
                        )
                    )

                nursery.start_soon(pay_alice)
                await trio.to_thread.run_sync(
                    answer, "carol wants to pay you 30. Accept? [y/N] ", "y"
                )
                await trio.to_thread.run_sync(shell.expect_exact, "carol paid you 30")
            assert result[0].returncode == 0, result[0].stdout
            # What she had typed is still there: finish the word and run it.
            shell.sendline("ory")
            await trio.to_thread.run_sync(shell.expect, r"received\s+30\s+80\s+carol")

            shell.sendline("4")  # menu: pay
            await trio.to_thread.run_sync(answer, "payee: ", "bob")
            await trio.to_thread.run_sync(answer, "amount: ", "0")
            await trio.to_thread.run_sync(answer, "positive whole number", "25")
            await trio.to_thread.run_sync(shell.expect_exact, "Paid 25 to bob")
            await trio.to_thread.run_sync(shell.expect_exact, "Your balance: 55")
            shell.sendline("5")  # menu: exit
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
        finally:
            shell.close(force=True)
            bob.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await bob.wait()
        assert shell.exitstatus == 0


@pytest.mark.parametrize("key", ["c", "d"], ids=["ctrl-c", "ctrl-d"])
def test_ctrl_c_and_ctrl_d_log_out_and_exit_cleanly(tmp_path: Path, key: str) -> None:
    trio.run(_leave_with, tmp_path, key)


async def _leave_with(tmp_path: Path, key: str) -> None:
    state = tmp_path / "state"
    env = dict(
        os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", P2PPAY_PASSWORD="dana's password"
    )
    async with server_process(state) as srv:
        done = await run_client(
            srv.port, state, "--user", "dana", "-c", "register", password="dana's password"
        )
        assert done.returncode == 0, done.stderr
        cmd = client_cmd(srv.port, state, "--user", "dana", "--listen-port", "0")
        shell = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30)
        try:
            await trio.to_thread.run_sync(shell.expect_exact, "Logged in as dana")
            await trio.to_thread.run_sync(shell.expect_exact, "dana>")
            if key == "c":
                shell.send("bal")  # Ctrl-C leaves even with half a command typed
            shell.sendcontrol(key)  # (Ctrl-D, as in any shell, on an empty line)
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
            shell.close()
        finally:
            shell.close(force=True)
        assert shell.exitstatus == 0
        # dana is logged out: nobody else sees her online any more
        done = await run_client(
            srv.port,
            state,
            "--user",
            "watcher",
            "--json",
            "-c",
            "register; list",
            password="watcher password",
        )
        listing = json_lines(done.stdout)[-1]["result"]
        assert [u["name"] for u in listing["online"]] == ["watcher"]


async def test_output_read_by_nobody_stops_the_client_quietly(tmp_path: Path) -> None:
    """``client -c "history --csv" | head``: once the reader has gone, the client stops
    quietly, as a program killed by SIGPIPE (141), the rest of the script not run; a command
    that had failed keeps its status. Never a traceback. (Buffered output, as for a person:
    the test's environment may ask for unbuffered.)"""
    state = tmp_path / "state"

    async def unread(*args: str) -> subprocess.CompletedProcess[bytes]:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first word
        env = {**os.environ, "P2PPAY_PASSWORD": "ann's password"}
        env.pop("PYTHONUNBUFFERED", None)
        try:
            return await trio.run_process(
                client_cmd(srv.port, state, "--user", "ann", *args),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                capture_stderr=True,
                check=False,
                env=env,
            )
        finally:
            os.close(write_end)

    with trio.fail_after(120):
        async with server_process(state) as srv:
            done = await unread("-c", "register; deposit 5; history")
            assert (done.returncode, done.stderr) == (ExitCode.OUTPUT_CLOSED, b"")
            failed = await unread("--user", "zed", "-c", "balance")  # (no such account)
            assert (failed.returncode, failed.stderr) == (ExitCode.FAILED, b"")
            async with Client.connect(
                "127.0.0.1", srv.port, ssl_context=client_context(state / "ca.pem"),
                server_hostname="localhost",
            ) as client:  # fmt: skip
                await client.login("ann", "ann's password")
                assert await client.balance() == 0  # the deposit after the first word never ran
