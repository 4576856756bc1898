"""What a person meets when something is wrong: one clear line and a documented exit status,
never a traceback (the real command line, as a subprocess)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import trio

from p2ppay.cli.exitcodes import ExitCode
from p2ppay.cli.main import build_parser, server_options
from p2ppay.server import ServerOptions
from p2ppay.settings import fields_and_flags

from .test_cli_client import client_cmd
from .test_loopback import server_process

pytestmark = pytest.mark.slow


def p2ppay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2ppay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done.stderr.strip().splitlines()[-1]


def server(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return p2ppay("server", "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state), *args)


def test_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "afile"
    state.write_text("")
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    assert last_line(done) == f"p2ppay server: the state directory {state} is not a directory"


def test_a_state_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    state = tmp_path / "afile" / "state"
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    assert last_line(done) == (
        f"p2ppay server: cannot create the state directory {state}: Not a directory"
    )


def test_a_ledger_that_cannot_be_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "ledger.sqlite3").mkdir(parents=True)  # unwritable as a file, even for root
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    assert last_line(done) == (
        f"p2ppay server: cannot write the ledger file {state / 'ledger.sqlite3'}: Is a directory"
    )


async def test_a_port_in_use(tmp_path: Path) -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    try:
        done = await trio.to_thread.run_sync(
            p2ppay, "server", "--host", "127.0.0.1", "--port", str(port),
            "--state-dir", str(tmp_path / "state"),
        )  # fmt: skip
    finally:
        await taken.aclose()
    assert done.returncode == ExitCode.FAILED
    assert last_line(done) == f"p2ppay server: 127.0.0.1 port {port} is already in use"


def test_a_certificate_that_is_not_one(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    done = server(tmp_path / "state", "--cert", str(junk), "--key", str(junk))
    assert done.returncode == ExitCode.FAILED
    assert last_line(done) == (
        f"p2ppay server: cannot use --cert {junk} with --key {junk}: they are not a PEM "
        "certificate chain and its private key"
    )
    done = p2ppay("client", "--cafile", str(junk), "-c", "list")
    assert done.returncode == ExitCode.USAGE
    assert last_line(done) == (
        f"p2ppay client: cannot use {junk} as the CA certificate: it holds no PEM certificate"
    )


def test_certificate_files_that_cannot_be_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "ca.pem").write_text("garbage\n")
    (state / "ca.key").write_text("garbage\n")
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    assert last_line(done).startswith(
        f"p2ppay server: the certificate files in {state} cannot be used ("
    )
    assert "restore them from a backup" in last_line(done)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = server(tmp_path / "state", "--scrypt-n", "3")
    assert done.returncode == ExitCode.USAGE
    assert last_line(done) == "p2ppay: --scrypt-n must be a power of 2 (at least 2)"
    done = server(tmp_path / "state", "--port", "8790", "--course-port", "8790")
    assert done.returncode == ExitCode.USAGE
    assert last_line(done) == "p2ppay: --port and --course-port are both 8790: give each its own"
    done = server(tmp_path / "state", "--course-greeting", "Connection\naccepted.")
    assert done.returncode == ExitCode.USAGE
    assert last_line(done) == (
        "p2ppay: --course-greeting must be one line of text, not empty and without a line "
        "break (leave the flag out for no greeting)"
    )
    done = p2ppay("client", "--frobnicate")
    assert done.returncode == ExitCode.USAGE
    assert "unrecognized arguments: --frobnicate" in last_line(done)


def _explained(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(option, its help as --help prints it) for every option of every subcommand."""
    found: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _explained(sub)
        else:
            formatter = parser._get_formatter()
            text = formatter._expand_help(action) if action.help else ""
            found.append((f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", text))
    return found


def test_every_flag_is_explained_once() -> None:
    explained = _explained(build_parser())
    assert len(explained) > 40
    for where, text in explained:
        assert text, f"{where} has no help"
        assert text.count("default") <= 1, (where, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (where, text)
    assert "Parses arguments" not in p2ppay("--help").stdout  # no docstring as description


def test_every_server_setting_is_a_flag() -> None:
    """Each field of the server's options and of every config they hold has its flag, and a
    value given on the command line reaches its field (so flags and fields cannot drift)."""
    argv = ["server", "--state-dir", "/tmp/x"]
    expected: dict[str, object] = {"state_dir": Path("/tmp/x")}
    for dest, _field, flag in fields_and_flags(ServerOptions):
        assert flag is not None, f"{dest} has no flag"
        assert flag.help, f"{flag.name} has no help"
        if dest == "state_dir":
            continue
        if flag.action == "store_true":
            argv.append(flag.name)
            expected[dest] = True
            continue
        value: object
        if flag.action == "append":
            text, value = "example.test", ("example.test",)
        elif flag.choices is not None:
            text = flag.choices[-1]
            value = flag.convert(text) if flag.convert else text
        else:
            text = {
                "--scrypt-n": "64",
                "--port": "4242",
                "--course-port": "4243",
                "--node-expiry": "70",  # longer than the heartbeat (7), as it must be
                "--ledger": "postgresql://p2ppay@db/p2ppay",  # --workers 7 needs PostgreSQL
            }.get(flag.name, "7")
            parsed = flag.parse(text) if flag.parse else text
            value = flag.convert(parsed) if flag.convert else parsed
        argv += [flag.name, text]
        expected[dest] = value
    options = server_options(build_parser().parse_args(argv))
    got: dict[str, object] = {}
    for dest in expected:
        obj: object = options
        for part in dest.split("__"):
            obj = getattr(obj, part)
        got[dest] = obj
    assert got == expected
    assert len(expected) >= 40
    assert options.config.peer_cert_lifetime == 7 * 3600  # hours on the command line


def test_the_readme_lists_every_server_flag() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n\n")[2]
    listed = set(re.findall(r"`(--[a-z-]+)", table))
    flags = {flag.name for _, _, flag in fields_and_flags(ServerOptions) if flag is not None}
    assert flags | {"--log-level"} <= listed, sorted(flags - listed)


def test_ctrl_c_at_the_password_prompt_leaves_cleanly(tmp_path: Path) -> None:
    trio.run(_ctrl_c_at_password, tmp_path)


async def _ctrl_c_at_password(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "P2PPAY_PASSWORD"}
    env.update(PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    async with server_process(state) as srv:
        cmd = client_cmd(srv.port, state, "--listen-port", "0")
        shell = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30)
        try:
            await trio.to_thread.run_sync(shell.expect_exact, "p2ppay>")
            shell.sendline("login zed")
            await trio.to_thread.run_sync(shell.expect_exact, "password:")
            shell.sendcontrol("c")
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
            output = shell.before or ""
        finally:
            shell.close(force=True)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert shell.exitstatus == ExitCode.OK
