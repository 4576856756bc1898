"""The server command meeting a ledger file or a state directory it cannot use: one line on
stderr, exit status 1 (4 for a damaged ledger), no traceback, and the file left as it was (the
real command line)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from p2ppay import ledger as lg
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.server import LEDGER_FILE

from .test_cli_errors import last_line, server

pytestmark = pytest.mark.slow


def test_a_ledger_file_that_is_not_a_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    junk = b"not a database, just some text that is long enough to be read as a header\n" * 4
    (state / LEDGER_FILE).write_bytes(junk)
    done = server(state)
    # (exit 4 since issue 22.12: a damaged ledger is not one a restart can mend)
    assert done.returncode == ExitCode.LEDGER
    assert last_line(done) == (
        f"p2ppay server: the ledger cannot be used: {state / LEDGER_FILE}: file is not a database;"
        " restore the ledger from a backup"
    )
    assert (state / LEDGER_FILE).read_bytes() == junk


def test_a_ledger_newer_than_the_code(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / LEDGER_FILE
    newer = lg.SCHEMA_VERSION + 1
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {newer}")
    db.close()
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    line = last_line(done)
    assert line.startswith("p2ppay server: ")
    assert f"{path} has schema version {newer}; this p2ppay knows {lg.SCHEMA_VERSION}" in line
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == newer
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        db.close()


def test_a_state_file_in_the_way(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "ca.pem").mkdir(parents=True)  # where the peer CA's certificate goes
    done = server(state)
    assert done.returncode == ExitCode.FAILED
    line = last_line(done)
    assert line.startswith("p2ppay server: Is a directory (")
    assert str(state / "ca.pem") in line
