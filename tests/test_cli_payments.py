"""Issue 13 through the real ``p2ppay client`` and ``p2ppay verify-receipt`` processes: memos,
payment requests, signed receipts, idempotent deposits and ``passwd``."""

from __future__ import annotations

import json
import os
import signal
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
from cryptography.hazmat.primitives import serialization

from p2ppay.pki import create_ca

from .test_cli_client import client_cmd, json_lines
from .test_loopback import server_process

pytestmark = pytest.mark.slow

PASSWORDS = {"alice": "alice's password", "bob": "bob's password", "carol": "carol's password"}


async def client(
    port: int, state: Path, user: str, script: str, *, env: dict[str, str] | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``script`` as ``user`` with --json: (exit status, JSON lines, stderr)."""
    environ = dict(os.environ)
    environ["P2PPAY_PASSWORD"] = PASSWORDS[user]
    environ.update(env or {})
    with trio.fail_after(60):
        done = await trio.run_process(
            client_cmd(port, state, "--user", user, "--json", "-c", script),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environ,
            stdin=subprocess.DEVNULL,
        )
    return done.returncode, json_lines(done.stdout), done.stderr.decode()


def result(lines: list[dict[str, Any]], command: str) -> Any:
    """The result of the last ``command`` in a script's JSON lines (it must have worked)."""
    found = [line for line in lines if line.get("command") == command]
    assert found and found[-1]["ok"], lines
    return found[-1]["result"]


def error_code(lines: list[dict[str, Any]]) -> str:
    failed = [line for line in lines if line.get("ok") is False]
    assert failed, lines
    return str(failed[-1]["error"]["code"])


async def verify(state: Path, receipt: Path, cafile: Path | None = None) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "p2ppay", "verify-receipt", str(receipt)]
    cmd += ["--cafile", str(cafile or state / "ca.pem")]
    with trio.fail_after(30):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@asynccontextmanager
async def serving(
    port: int, state: Path, user: str
) -> AsyncIterator[tuple[trio.Process, bytearray]]:
    """``user`` online taking every offer (``-c serve --accept all --json``); its output."""
    environ = dict(os.environ, P2PPAY_PASSWORD=PASSWORDS[user])
    cmd = client_cmd(port, state, "--user", user, "--accept", "all", "--json", "-c", "serve")
    process = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=environ
    )
    out = bytearray()
    try:
        await read_until(process, out, b'"command": "login"')
        yield process, out
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()


async def read_until(process: trio.Process, out: bytearray, text: bytes) -> None:
    assert process.stdout is not None
    with trio.fail_after(30):
        while text not in out:
            chunk = await process.stdout.receive_some()
            assert chunk, f"the client ended: {out!r}"
            out.extend(chunk)


async def register(port: int, state: Path, *users: str, deposit: int = 0) -> None:
    for user in users:
        script = "register" + (f"; deposit {deposit}" if deposit else "")
        code, lines, err = await client(port, state, user, script)
        assert code == 0, (lines, err)


async def test_a_memo_goes_from_offer_to_history_and_receipt(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with server_process(state) as srv:
        await register(srv.port, state, "bob", "carol")
        await register(srv.port, state, "alice", deposit=500)
        async with serving(srv.port, state, "bob") as (bob, bob_out):
            code, lines, err = await client(
                srv.port, state, "alice", 'pay bob 30 --memo "lunch at noon, 🍜"'
            )
            assert code == 0, (lines, err)
            paid = result(lines, "pay")
            assert (paid["amount"], paid["memo"], paid["balance"]) == (30, "lunch at noon, 🍜", 470)
            pid = paid["payment_id"]
            await read_until(bob, bob_out, b'"event": "payment_received"')
        events = json_lines(bytes(bob_out))
        offers = [e for e in events if e.get("event") == "offer_answered"]
        assert offers[0]["offer"]["memo"] == "lunch at noon, 🍜"  # the offer bob saw
        received = [e for e in events if e.get("event") == "payment_received"]
        assert received[0]["memo"] == "lunch at noon, 🍜"

        # A memo with a control character never leaves the client.
        code, lines, _ = await client(srv.port, state, "alice", "pay bob 1 --memo 'a\x1b[2Jb'")
        assert code == 2 and "control characters" in lines[-1]["error"]["message"]

        # Both sides' history show the memo; both may fetch the receipt, nobody else.
        receipt_file = tmp_path / "receipt.json"
        code, lines, err = await client(
            srv.port, state, "alice", f"history 5; receipt {pid} --out {receipt_file}"
        )
        assert code == 0, (lines, err)
        sent = result(lines, "history")["entries"][0]
        assert (sent["kind"], sent["memo"], sent["payment_id"]) == (
            "sent",
            "lunch at noon, 🍜",
            pid,
        )
        code, lines, _ = await client(srv.port, state, "bob", f"history 1; receipt {pid}")
        assert result(lines, "history")["entries"][0]["memo"] == "lunch at noon, 🍜"
        assert result(lines, "receipt")["payment_id"] == pid
        code, lines, _ = await client(srv.port, state, "carol", f"receipt {pid}")
        assert code == 1 and error_code(lines) == "unknown_payment"

        receipt = json.loads(receipt_file.read_text())
        assert receipt["amount"] == 30 and type(receipt["amount"]) is int
        assert (receipt["payer"], receipt["payee"], receipt["memo"]) == (
            "alice",
            "bob",
            "lunch at noon, 🍜",
        )
        code, out, err = await verify(state, receipt_file)
        assert code == 0, err
        assert out.count("\n") == 1 and "alice paid bob 30" in out and pid in out

        # Any field altered: refused, with the reason.
        altered: dict[str, object] = {
            "payment_id": str(uuid.uuid4()),
            "payer": "carol",
            "payee": "carol",
            "amount": 31,
            "memo": "lunch at noom, 🍜",
            "at_ms": receipt["at_ms"] + 1,
            "signature": receipt["signature"][:-8] + "AAAAAAA=",
            "format": "p2ppay-receipt-v2",
        }
        for field, value in [*altered.items(), ("memo", None)]:
            forged = tmp_path / f"forged-{field}.json"
            forged.write_text(json.dumps({**receipt, field: value}))
            code, out, err = await verify(state, forged)
            assert code == 1, (field, out, err)
            assert "NOT valid" in err and err.count("\n") == 1, (field, err)
        # Checked against another CA (and with the signer certificate of another CA).
        other_ca, _other_key = create_ca("another CA")
        other = tmp_path / "other-ca.pem"
        other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
        code, _, err = await verify(state, receipt_file, other)
        assert code == 1 and "not issued by this CA" in err
        # A file that is not a receipt at all, or a CA that cannot be read: usage (2).
        (tmp_path / "junk.json").write_text("{not json")
        assert (await verify(state, tmp_path / "junk.json"))[0] == 2
        assert (await verify(state, receipt_file, tmp_path / "missing.pem"))[0] == 2


async def test_a_request_is_paid_while_its_requester_is_offline(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with server_process(state) as srv:
        await register(srv.port, state, "bob")
        await register(srv.port, state, "alice", deposit=100)
        code, lines, err = await client(
            srv.port, state, "bob", "request alice 40 --memo 'rent; May' --expires 2h"
        )
        assert code == 0, (lines, err)
        made = result(lines, "request")
        rid = made["request_id"]
        assert (made["payer"], made["amount"], made["state"], made["memo"]) == (
            "alice",
            40,
            "open",
            "rent; May",
        )
        # bob's client has left: he is offline. alice sees the request and pays it.
        code, lines, err = await client(
            srv.port, state, "alice", f"requests; pay --request {rid}; pay --request {rid}"
        )
        assert code == 0, (lines, err)
        listed = next(x for x in lines if x.get("command") == "requests")["result"]
        assert [r["request_id"] for r in listed["incoming"]] == [rid]
        pays = [x["result"] for x in lines if x.get("command") == "pay"]
        # The second is a retry: the same payment (the request id), nothing moved again.
        assert [(x["payment_id"], x["balance"], x["memo"]) for x in pays] == [
            (rid, 60, "rent; May"),
            (rid, 60, "rent; May"),
        ]
        # bob logs in and is told.
        code, lines, err = await client(srv.port, state, "bob", "balance; requests")
        assert code == 0, (lines, err)
        news = [x for x in lines if x.get("event") == "request_closed"]
        assert [(n["request"]["request_id"], n["request"]["state"]) for n in news] == [
            (rid, "paid")
        ]
        assert result(lines, "balance") == {"balance": 40}
        assert result(lines, "requests") == {
            "incoming": [],
            "outgoing": [],
            "incoming_total": 0,
            "outgoing_total": 0,
        }
        # Told once: the next login has no news.
        code, lines, _ = await client(srv.port, state, "bob", "balance")
        assert not [x for x in lines if x.get("event") == "request_closed"]


async def test_expired_declined_and_cancelled_requests_cannot_be_paid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with server_process(state) as srv:
        await register(srv.port, state, "bob")
        await register(srv.port, state, "alice", deposit=100)
        code, lines, err = await client(
            srv.port,
            state,
            "bob",
            "request alice 5 --expires 1s; request alice 6; request alice 7",
        )
        assert code == 0, (lines, err)
        expiring, declined, cancelled = (
            x["result"]["request_id"] for x in lines if x.get("command") == "request"
        )
        code, lines, err = await client(srv.port, state, "alice", f"decline-request {declined}")
        assert code == 0 and result(lines, "decline-request")["state"] == "declined", err
        code, lines, err = await client(srv.port, state, "bob", f"cancel-request {cancelled}")
        assert code == 0 and result(lines, "cancel-request")["state"] == "cancelled", err
        await trio.sleep(1.5)  # past the first request's expiry (the server's wall clock)
        for rid, refusal in (
            (expiring, "request_expired"),
            (declined, "request_declined"),
            (cancelled, "request_cancelled"),
            (str(uuid.uuid4()), "unknown_request"),
        ):
            code, lines, _ = await client(srv.port, state, "alice", f"pay --request {rid}")
            assert (code, error_code(lines)) == (1, refusal)
            assert lines[-1]["error"]["payment_id"] == rid  # the request id is the payment id
        # A request has its own amount, memo and id: none of them goes with --request.
        for extra in ("bob 6", "--memo hi", f"--id {declined}"):
            code, lines, _ = await client(
                srv.port, state, "alice", f"pay --request {declined} {extra}"
            )
            assert (code, error_code(lines)) == (2, "usage"), extra
            assert lines[-1]["error"]["payment_id"] == declined
        # Declining or cancelling again is refused too; nothing moved.
        code, lines, _ = await client(srv.port, state, "bob", f"cancel-request {declined}")
        assert (code, error_code(lines)) == (1, "request_declined")
        code, lines, _ = await client(srv.port, state, "alice", f"decline-request {cancelled}")
        assert (code, error_code(lines)) == (1, "request_cancelled")
        code, lines, _ = await client(srv.port, state, "alice", f"cancel-request {expiring}")
        assert (code, error_code(lines)) == (1, "unknown_request")  # not alice's to cancel
        code, lines, _ = await client(srv.port, state, "alice", "balance")
        assert result(lines, "balance") == {"balance": 100}


async def test_a_deposit_retried_with_its_id_moves_money_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    did = str(uuid.uuid4())
    async with server_process(state) as srv:
        await register(srv.port, state, "alice")
        code, lines, err = await client(
            srv.port, state, "alice", f"deposit 100 --id {did}; deposit 100 --id {did}; balance"
        )
        assert code == 0, (lines, err)
        assert [x["result"] for x in lines if "command" in x][1:] == [
            {"balance": 100},
            {"balance": 100},
            {"balance": 100},
        ]
        # Again from another process (as a script retrying after a lost reply would).
        code, lines, _ = await client(srv.port, state, "alice", f"deposit 100 --id {did}")
        assert result(lines, "deposit") == {"balance": 100}
        code, lines, _ = await client(srv.port, state, "alice", f"deposit 50 --id {did}")
        assert (code, error_code(lines)) == (1, "deposit_id_conflict")
        code, lines, _ = await client(srv.port, state, "alice", "deposit 7; deposit 7; balance")
        assert result(lines, "balance") == {"balance": 114}  # no id given: two deposits


async def test_passwd_changes_the_password_and_ends_the_other_session(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with server_process(state) as srv:
        await register(srv.port, state, "alice")
        async with serving(srv.port, state, "alice") as (other, other_out):
            new = {"P2PPAY_NEW_PASSWORD": "a new password"}
            code, lines, err = await client(srv.port, state, "alice", "passwd", env=new)
            assert code == 0, (lines, err)
            assert result(lines, "passwd") == {}
            with trio.fail_after(20):
                await other.wait()  # the other session was ended, and did not come back
            await read_until(other, other_out, b"session_replaced")
        code, lines, _ = await client(srv.port, state, "alice", "balance")
        assert (code, error_code(lines)) == (1, "auth_failed")  # the old password
        code, lines, _ = await client(
            srv.port, state, "alice", "balance", env={"P2PPAY_PASSWORD": "a new password"}
        )
        assert code == 0 and result(lines, "balance") == {"balance": 0}
        # A wrong current password is refused; a too short new one never reaches the server.
        code, lines, _ = await client(
            srv.port,
            state,
            "alice",
            "passwd",
            env={"P2PPAY_PASSWORD": "a new password", "P2PPAY_NEW_PASSWORD": "short"},
        )
        assert (code, error_code(lines)) == (2, "usage")


async def test_the_payee_is_asked_with_the_memo_and_changes_its_password_at_a_terminal(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    async with server_process(state) as srv:
        await register(srv.port, state, "bob")
        await register(srv.port, state, "alice", deposit=100)
        cmd = client_cmd(srv.port, state, "--user", "bob", "--listen-port", "0")
        env = {k: v for k, v in os.environ.items() if k != "P2PPAY_PASSWORD"}
        shell = pexpect.spawn(
            cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30, dimensions=(40, 160)
        )
        try:

            def answer(expected: str, reply: str) -> None:
                shell.expect_exact(expected.rstrip())
                shell.sendline(reply)

            await trio.to_thread.run_sync(answer, "password: ", PASSWORDS["bob"])
            await trio.to_thread.run_sync(shell.expect_exact, "Logged in as bob")
            await trio.to_thread.run_sync(shell.expect_exact, "bob>")
            async with trio.open_nursery() as nursery:
                paid: list[tuple[int, list[dict[str, Any]], str]] = []

                async def pay_bob() -> None:
                    paid.append(
                        await client(srv.port, state, "alice", "pay bob 30 --memo 'lunch at noon'")
                    )

                nursery.start_soon(pay_bob)
                await trio.to_thread.run_sync(
                    answer, 'alice wants to pay you 30 for "lunch at noon". Accept? [y/N] ', "y"
                )
                await trio.to_thread.run_sync(
                    shell.expect_exact, 'alice paid you 30 for "lunch at noon"'
                )
            assert paid[0][0] == 0, paid
            shell.sendline("passwd")
            await trio.to_thread.run_sync(answer, "current password: ", PASSWORDS["bob"])
            await trio.to_thread.run_sync(answer, "new password: ", "bob's new password")
            await trio.to_thread.run_sync(answer, "again: ", "bob's new password")
            await trio.to_thread.run_sync(shell.expect_exact, "Password changed")
            shell.sendline("exit")
            await trio.to_thread.run_sync(shell.expect, pexpect.EOF)
        finally:
            shell.close(force=True)
        code, lines, _ = await client(
            srv.port, state, "bob", "balance", env={"P2PPAY_PASSWORD": "bob's new password"}
        )
        assert code == 0 and result(lines, "balance") == {"balance": 30}


async def test_verify_receipt_refuses_hostile_files_in_one_line(tmp_path: Path) -> None:
    from p2ppay.pki import create_ca

    ca, _key = create_ca("a CA")
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    deep, huge = tmp_path / "deep.json", tmp_path / "huge.json"
    deep.write_text("[" * 100_000)
    huge.write_text(json.dumps({"pad": "x" * 100_000}))
    for hostile in (deep, huge):
        code, out, err = await verify(tmp_path, hostile, cafile)
        assert code == 2, err  # cannot read: not "an invalid receipt"
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert out == ""
