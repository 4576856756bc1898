"""Server sessions over in-memory TLS: the whole native protocol, end to end, without sockets."""

from __future__ import annotations

import json
import math
import ssl
import uuid
from typing import Any

import msgspec.structs
import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost, ServerError
from p2ppay.client.peer import PeerKey
from p2ppay.ledger import SqliteLedger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig

from .conftest import (
    FAST_SCRYPT,
    KEYS,
    SERVER_NAME,
    Connect,
    acceptance,
    closed_by_peer,
    expect_error,
    login,
    next_event,
    pay,
    raw_tls,
    registered,
)


async def test_full_flow(connect: Connect, ledger: SqliteLedger) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            assert alice.server_version and alice.server_version.startswith("p2ppay/")
            await alice.register("alice", "alice password")
            await bob.register("bob", "bob password")
            me = await login(alice, "alice", "alice password", p2p_port=9001)
            assert (me.name, me.balance, me.ip, me.port) == ("alice", 0, "10.0.0.1", 9001)
            await login(bob, "bob", "bob password", p2p_port=9002)
            assert await alice.deposit(500) == 500

            listing = await alice.list()
            assert listing.balance == 500
            assert listing.online == [
                p.Presence("alice", "10.0.0.1", 9001),
                p.Presence("bob", "10.0.0.2", 9002),
            ]
            assert await alice.lookup("bob") == p.Presence("bob", "10.0.0.2", 9002)

            pid = uuid.uuid4()
            paid = await pay(alice, "bob", 120, payment_id=pid)
            assert paid == p.SettleResult(pid, "alice", "bob", 120, 380)
            again = await pay(alice, "bob", 120, payment_id=pid)
            assert again == paid  # same reply, no second move

            event = await next_event(bob, 5)
            assert event == p.PaymentReceived(pid, "alice", 120, 120)
            assert (await alice.list()).balance == 380
            assert (await bob.list()).balance == 120
            history = await bob.history()
            assert [(e.kind, e.amount, e.counterparty, e.payment_id) for e in history] == [
                ("received", 120, "alice", pid)
            ]

            await alice.logout()
            assert [u.name for u in (await bob.list()).online] == ["bob"]
            await expect_error("not_logged_in", alice.list())
    audit = await ledger.audit()
    assert (audit.total_balances, audit.total_deposits, audit.transfers) == (500, 500, 1)
    with trio.fail_after(5):  # a single event was pushed: the retry sent none
        async with connect() as bob:
            await login(bob, "bob", "bob password")
            assert len(await bob.history()) == 1


async def test_every_error_has_its_own_code(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob, connect() as anon:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            await expect_error("name_taken", anon.register("alice", "whatever123"))
            # Unknown user and wrong password get one answer, so logins cannot probe names.
            wrong = await expect_error("auth_failed", anon.login("alice", "not the password"))
            unknown = await expect_error("auth_failed", anon.login("mallory", "whatever123"))
            assert wrong.message == unknown.message
            await expect_error("not_logged_in", anon.deposit(5))
            await expect_error("not_logged_in", anon.settle(uuid.uuid4(), "bob", 5, "AAAA"))
            await expect_error("insufficient_funds", pay(alice, "bob", 101))
            await expect_error("bad_amount", alice.deposit(1_000_001))
            await expect_error("bad_amount", pay(alice, "bob", 1_000_001))
            await expect_error("self_payment", pay(alice, "alice", 5))
            await expect_error("unknown_payee", alice.settle(uuid.uuid4(), "nobody", 5, "AAAA"))
            await expect_error("unknown_user", alice.lookup("nobody"))
            await expect_error("already_logged_in", alice.login("alice", "correct horse"))
            pid = uuid.uuid4()
            await pay(alice, "bob", 10, payment_id=pid)
            await expect_error("payment_id_conflict", pay(alice, "bob", 11, payment_id=pid))
            await bob.logout()
            await expect_error("payee_offline", alice.lookup("bob"))
            # The malformed-amount path is caught by the protocol before any handler.
            err = await expect_error("bad_request", alice.deposit(0))
            assert "amount" in err.message
            assert (await alice.list()).balance == 90


async def test_bad_lines_get_errors_and_the_session_goes_on(
    server: Server, client_ctx: ssl.SSLContext
) -> None:
    async with raw_tls(server, client_ctx, "10.9.9.9") as stream:
        lines = p.LineBuffer(1 << 20)

        async def exchange(data: bytes) -> dict[str, object]:
            await stream.send_all(data)
            while (line := lines.next_line()) is None:
                lines.feed(await stream.receive_some())
            import json

            reply = json.loads(line)
            assert isinstance(reply, dict)
            return reply

        with trio.fail_after(5):
            assert (await exchange(b'{"id":1,"op":"list"}\n'))["error"] == {
                "code": "hello_required",
                "message": "send hello first",
            }
            assert (await exchange(b'{"id":2,"op":"hello","version":2}\n'))["error"][  # type: ignore[index]
                "code"
            ] == "unsupported_version"
            ok = await exchange(b'{"id":3,"op":"hello","version":1}\n')
            assert ok["ok"] is True and ok["id"] == 3
            for bad, code in [
                (b"\xff\xfe\xfd\n", "bad_request"),
                (b"{nope\n", "bad_request"),
                (b'{"id":4,"op":"steal"}\n', "unknown_op"),
                (b'{"id":5,"op":"deposit","amount":"9"}\n', "bad_request"),
                (b'{"id":5,"op":"deposit","amount":9}\n', "not_logged_in"),
            ]:
                reply = await exchange(bad)
                assert reply["ok"] is False
                assert reply["error"]["code"] == code, (bad, reply)  # type: ignore[index]
            ok = await exchange(b'{"id":6,"op":"register","name":"zed","password":"12345678"}\n')
            assert ok == {"id": 6, "ok": True, "result": {"name": "zed"}}


async def test_an_over_long_line_closes_the_connection(
    issuer: Issuer,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    connect: Connect,
) -> None:
    srv = Server(ledger, server_ctx, issuer, ServerConfig(max_line=1024))
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run_in_memory)
        nursery.start_soon(srv.handle_connection, server_side, "10.6.6.6")
        stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
        with trio.fail_after(5):
            async with Client.over(stream) as client:
                with pytest.raises(ConnectionLost):
                    await client.register("x" * 10, "y" * 1000)  # a request line > 1 KiB
        nursery.cancel_scope.cancel()


async def test_second_login_replaces_the_first(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as first, connect("10.0.0.2") as second:
            await registered(first, "alice", p2p_port=9001)
            await second.login("alice", "correct horse", p2p_port=9005)
            event = await next_event(first, 5)
            assert isinstance(event, p.SessionReplaced)
            with pytest.raises(ConnectionLost):
                await next_event(first, 5)  # and then the old connection is closed
            with pytest.raises(ConnectionLost):
                await first.list()
            listing = await second.list()
            assert listing.online == [p.Presence("alice", "10.0.0.2", 9005)]


async def test_abrupt_disconnect_logs_out(connect: Connect, server: Server) -> None:
    with trio.fail_after(10):
        async with connect() as watcher:
            await registered(watcher, "watcher")
            async with connect() as alice:
                await registered(alice, "alice")
                assert set(server.presence.names()) == {"watcher", "alice"}
                await alice.stream.aclose()  # vanish without logging out
                with trio.fail_after(5):
                    while server.presence.local("alice") is not None:
                        await trio.testing.wait_all_tasks_blocked()
            assert [u.name for u in (await watcher.list()).online] == ["watcher"]


async def test_concurrent_settlements_through_the_server(connect: Connect) -> None:
    with trio.fail_after(20):
        async with connect() as alice, connect() as bob:
            await registered(alice, "alice", deposit=200)
            await registered(bob, "bob")
            results: list[str] = []

            async def pay_once() -> None:
                try:
                    await pay(alice, "bob", 10)
                    results.append("ok")
                except ServerError as exc:
                    results.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(pay_once)
            assert results.count("ok") == 20
            assert results.count("insufficient_funds") == 30
            assert (await alice.list()).balance == 0
            assert (await bob.list()).balance == 200


async def test_closed_by_peer_tells_an_open_stream_from_a_closed_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    assert not await closed_by_peer(left, within=1)  # the other end is still there
    await right.aclose()
    assert await closed_by_peer(left, within=1)


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock, server: Server) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    with trio.fail_after(server.config.handshake_timeout + 5):
        await server.handle_connection(server_side, "10.1.1.1")  # returns: the peer said nothing
    assert await closed_by_peer(client_side)
    assert not server.sessions


async def test_silent_anonymous_connection_is_closed(
    autojump_clock: trio.testing.MockClock, connect: Connect, server: Server
) -> None:
    async with connect() as client:
        with pytest.raises(ConnectionLost):
            await next_event(client, server.config.anonymous_idle_timeout + 5)


async def test_logged_in_sessions_may_stay_silent(
    autojump_clock: trio.testing.MockClock, connect: Connect, server: Server
) -> None:
    async with connect(request_timeout=math.inf) as client:
        await registered(client, "patient")
        await trio.sleep(server.config.anonymous_idle_timeout * 10)
        assert (await client.list()).online[0].name == "patient"


async def test_garbage_instead_of_tls(server: Server) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side, "10.2.2.2")
        await client_side.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert await closed_by_peer(client_side)
    assert not server.sessions


async def test_shutdown_tells_clients_and_ends_sessions(connect: Connect, server: Server) -> None:
    with trio.fail_after(10):
        async with connect() as alice:
            await registered(alice, "alice")
            server.shutdown()
            event = await next_event(alice, 5)
            assert isinstance(event, p.ServerClosing)
            with pytest.raises(ConnectionLost):
                await next_event(alice, 5)


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Mock time that jumps ahead only once nothing has run for 50 ms of real time: the ledger's
    threads finish their (real-time) work, and the timeouts then come at once."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_slow_reader_does_not_hold_up_the_payer(
    idle_jump_clock: trio.testing.MockClock,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
) -> None:
    write_timeout = 3.0
    server = Server(
        ledger, server_ctx, issuer, ServerConfig(write_timeout=write_timeout, scrypt=FAST_SCRYPT)
    )

    bob_gone = trio.Event()

    async def connect_raw(
        ip: str, stream_pair: tuple[trio.abc.Stream, trio.abc.Stream]
    ) -> trio.SSLStream[trio.abc.Stream]:
        client_side, server_side = stream_pair

        async def serve() -> None:
            await server.handle_connection(server_side, ip)
            if ip == "10.3.3.3":
                bob_gone.set()

        nursery.start_soon(serve)
        return trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_in_memory)
        alice_stream = await connect_raw("10.0.0.1", trio.testing.memory_stream_pair())
        # bob logs in over a lockstep pipe and then never reads again: pushes to him cannot go.
        bob = await connect_raw("10.3.3.3", trio.testing.lockstep_stream_pair())
        async with Client.over(alice_stream, request_timeout=math.inf) as alice:
            await alice.register("bob", "correct horse")
            await registered(alice, "alice", deposit=100)
            lines = p.LineBuffer()
            KEYS["bob"] = key = PeerKey()
            bob_login = p.Login(2, "bob", "correct horse", None, key.csr("bob"))
            for request in (p.Hello(1, 1), bob_login):
                await bob.send_all(p.encode_request(request))
                while lines.next_line() is None:
                    lines.feed(await bob.receive_some())
            assert server.presence.local("bob") is not None
            with trio.fail_after(60):
                for _ in range(5):
                    await pay(alice, "bob", 1)
            # Had alice waited for bob's events, the write timeout would have dropped him by now.
            assert server.presence.local("bob") is not None
            assert (await alice.list()).balance == 95
            with trio.fail_after(write_timeout + 10):
                await bob_gone.wait()
            assert server.presence.local("bob") is None
        nursery.cancel_scope.cancel()


async def test_requests_queued_at_shutdown_are_refused_not_dropped(
    server: Server, client_ctx: ssl.SSLContext
) -> None:
    async with raw_tls(server, client_ctx, "10.4.4.4") as stream:
        client = p.ClientConnection()
        await stream.send_all(client.send_request(p.Hello(1, 1)))
        with trio.fail_after(5):
            while isinstance(event := client.next_event(), p.Sentinel):
                client.receive_data(await stream.receive_some())
        assert isinstance(event, p.ReplyOk)
        # Three requests in one write; the server is busy with the first (its ledger and hash
        # work runs in threads) when the shutdown comes.
        await stream.send_all(
            b"".join(client.send_request(p.Register(i, f"user{i}", "password1")) for i in (2, 3, 4))
        )
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
        seen: list[object] = []
        with trio.fail_after(5):
            while len(seen) < 4:
                event = client.next_event()
                if event is p.CLOSED:
                    break
                if isinstance(event, p.Sentinel):
                    client.receive_data(await stream.receive_some())
                else:
                    seen.append(event)
    # The request in progress finishes; the ones still queued are refused, never dropped
    # silently; then the closing event comes.
    assert len(seen) == 4, seen
    assert isinstance(seen[0], p.ReplyOk)
    assert isinstance(seen[3], p.ServerClosing)
    assert seen[2] == p.ReplyError(4, "shutting_down", "the server is shutting down; not done")
    assert isinstance(seen[1], p.ReplyOk | p.ReplyError)


# --- names: one canonical form, shown as registered ------------------------------------------


async def test_names_are_case_insensitive_and_shown_as_registered(
    connect: Connect, server: Server
) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await alice.register("Alice", "alice password")
            await expect_error("name_taken", bob.register("ALICE", "other password"))
            me = await login(alice, "alice", "alice password", p2p_port=9001)
            assert me.name == "Alice"  # as registered, whatever the login said
            assert alice.user == "Alice"
            await registered(bob, "bob", deposit=100)
            assert await bob.lookup("aLiCe") == p.Presence("Alice", "10.0.0.1", 9001)
            assert [u.name for u in (await bob.list()).online] == ["Alice", "bob"]
            current = server.presence.local("ALICE")
            assert current is not None and current.user == "Alice"
            # KEYS (the test's record of peer keys) is by name as given: sign as "Alice" did.
            KEYS["ALICE"] = KEYS["alice"]
            pid = uuid.uuid4()
            paid = await pay(bob, "ALICE", 30, payment_id=pid)
            assert (paid.payer, paid.payee, paid.balance) == ("bob", "Alice", 70)
            assert await next_event(alice) == p.PaymentReceived(pid, "bob", 30, 30)
            assert (await pay(bob, "alice", 30, payment_id=pid)) == paid  # the same payment
            entries = await alice.history()
            assert [(e.kind, e.counterparty) for e in entries] == [("received", "bob")]
            await expect_error("self_payment", pay(alice, "ALICE", 1))
            await expect_error("unknown_user", bob.lookup("Nobody"))


async def test_a_login_in_another_letter_case_replaces_the_session(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect("10.0.0.1") as first, connect("10.0.0.2") as second:
            await first.register("Carol", "correct horse")
            await login(first, "carol", p2p_port=9001)
            await login(second, "CAROL", p2p_port=9002)
            assert isinstance(await next_event(first), p.SessionReplaced)
            assert (await second.list()).online == [p.Presence("Carol", "10.0.0.2", 9002)]


async def test_names_of_punctuation_only_cannot_be_registered(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as client:
            for name in (".", "..", "-", "_", ".-_", "-rf", ".profile"):
                err = await expect_error("bad_request", client.register(name, "long enough"))
                assert "name" in err.message


# --- peer keys: only the current session's key accepts ---------------------------------------


async def test_logout_revokes_the_sessions_peer_key(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            pending = uuid.uuid4()
            signed_before = acceptance(pending, "alice", "bob", 20)
            await bob.logout()
            err = await expect_error(
                "bad_acceptance", alice.settle(pending, "bob", 20, signed_before)
            )
            assert "no current peer key" in err.message
            await login(bob, "bob")  # a new key: the old acceptance still does not count
            await expect_error("bad_acceptance", alice.settle(pending, "bob", 20, signed_before))
            assert (await pay(alice, "bob", 20)).balance == 80  # the new key works


async def test_a_login_without_a_csr_revokes_the_previous_key(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob_old:
            await registered(alice, "alice", deposit=100)
            await registered(bob_old, "bob")
            pending = uuid.uuid4()
            signed_before = acceptance(pending, "alice", "bob", 20)
            async with connect() as bob_new:
                await bob_new.login("bob", "correct horse")  # no CSR: no key at all
                await expect_error(
                    "bad_acceptance", alice.settle(pending, "bob", 20, signed_before)
                )
            assert (await alice.list()).balance == 100


async def test_a_revoked_key_survives_a_server_restart_revoked(
    connect: Connect, server: Server, ledger: SqliteLedger
) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            await bob.logout()
    account = await ledger.account("BOB")
    assert account is not None and account.peer_key is None
    assert account.peer_key_expires_ms is None


# --- payment ids: canonical only -------------------------------------------------------------


async def test_non_canonical_payment_ids_are_refused(
    server: Server, client_ctx: ssl.SSLContext, ledger: SqliteLedger
) -> None:
    async with raw_tls(server, client_ctx, "10.5.5.5") as stream:
        lines = p.LineBuffer()

        async def exchange(line: str) -> dict[str, Any]:
            await stream.send_all(line.encode() + b"\n")
            while (reply := lines.next_line()) is None:
                lines.feed(await stream.receive_some())
            decoded: dict[str, Any] = json.loads(reply)
            return decoded

        with trio.fail_after(10):
            assert (await exchange('{"id":1,"op":"hello","version":1}'))["ok"]
            reg = '{"id":2,"op":"register","name":"payer","password":"long enough"}'
            assert (await exchange(reg))["ok"]
            assert (
                await exchange('{"id":3,"op":"login","name":"payer","password":"long enough"}')
            )["ok"]
            pid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0fabcdef12"
            for i, spelling in enumerate((pid.upper(), pid.replace("-", ""), f"{{{pid}}}")):
                reply = await exchange(
                    f'{{"id":{10 + i},"op":"settle","payment_id":"{spelling}",'
                    f'"payee":"bob","amount":1,"acceptance":"AA=="}}'
                )
                assert reply["id"] == 10 + i and reply["error"]["code"] == "bad_request", reply
                assert "canonical" in reply["error"]["message"]
    assert (await ledger.audit()).transfers == 0


# --- deadlines: totals, not per read ---------------------------------------------------------


async def test_a_request_line_dripping_in_is_cut_at_the_line_deadline(
    autojump_clock: trio.testing.MockClock,
    connect: Connect,
    server: Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    line_timeout = server.config.line_timeout
    async with connect(request_timeout=math.inf) as client:
        await registered(client, "dripper")  # logged in: no idle limit, only the line's
        stream = client.stream
        started = trio.current_time()
        with trio.fail_after(line_timeout * 3):
            try:
                await stream.send_all(b'{"id":99,')
                while not client.closed:
                    await trio.sleep(1)
                    await stream.send_all(b" ")  # one byte a second, never the newline
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with pytest.raises(ConnectionLost):
                await client.list()
        took = trio.current_time() - started
    assert line_timeout <= took <= line_timeout + 2
    assert any(
        "timeout" in r.getMessage() and "request line" in r.getMessage() for r in caplog.records
    )


async def test_requests_dripping_in_whole_do_not_trip_the_line_deadline(
    autojump_clock: trio.testing.MockClock, connect: Connect, server: Server
) -> None:
    async with connect(request_timeout=math.inf) as client:
        await registered(client, "steady")
        for _ in range(int(server.config.line_timeout)):
            await trio.sleep(5)
            assert (await client.list()).online[0].name == "steady"


async def test_the_pre_login_timeout_is_a_total(
    autojump_clock: trio.testing.MockClock, server: Server, client_ctx: ssl.SSLContext
) -> None:
    idle = server.config.anonymous_idle_timeout
    async with raw_tls(server, client_ctx, "10.8.8.8") as stream:
        client = p.ClientConnection()
        started = trio.current_time()
        rid = 1
        with trio.fail_after(idle * 3):
            try:
                await stream.send_all(client.send_request(p.Hello(rid, 1)))
                while True:
                    # A request every 10 s, each answered: per read, it would never end.
                    event = client.next_event()
                    if event is p.CLOSED:
                        break
                    if event is p.NEED_DATA:
                        with trio.move_on_after(10):
                            client.receive_data(await stream.receive_some())
                            continue
                        rid += 1
                        await stream.send_all(client.send_request(p.ListOnline(rid)))
            except trio.BrokenResourceError:
                pass
        took = trio.current_time() - started
    assert idle <= took <= idle + 11
    assert rid >= idle // 10 - 1


async def test_payment_status_is_for_the_payer_and_the_payee_only(connect: Connect) -> None:
    with trio.fail_after(10):
        async with (
            connect("10.0.0.1") as alice,
            connect("10.0.0.2") as bob,
            connect("10.0.0.3") as eve,
        ):
            await registered(alice, "Alice", deposit=100)
            await registered(bob, "bob")
            await registered(eve, "eve")
            pid = uuid.uuid4()
            await pay(alice, "bob", 30, payment_id=pid)
            settled = await alice.payment_status(pid)
            assert settled.settled and (settled.payer, settled.payee, settled.amount) == (
                "Alice",
                "bob",
                30,
            )
            assert settled.balance == 70  # each party's own balance right after it
            assert settled.at_ms is not None and settled.at_ms > 0
            seen_by_bob = await bob.payment_status(pid)
            assert seen_by_bob.balance == 30
            assert msgspec.structs.replace(seen_by_bob, balance=70) == settled
            # To anyone else a settled payment is word for word an unknown one.
            unknown = uuid.uuid4()
            assert await eve.payment_status(pid) == p.PaymentStatusResult(pid, settled=False)
            assert await eve.payment_status(unknown) == p.PaymentStatusResult(unknown, False)
            assert await alice.payment_status(unknown) == p.PaymentStatusResult(unknown, False)


async def test_history_pages_through_the_protocol(connect: Connect) -> None:
    with trio.fail_after(20):
        async with connect("10.0.0.1") as alice, connect("10.0.0.2") as bob:
            await registered(alice, "alice", deposit=1000)
            await registered(bob, "bob")
            for amount in range(1, 12):
                await pay(alice, "bob", amount)
            whole = await alice.history_page(1000)
            assert whole.next is None and len(whole.entries) == 12
            pages: list[p.HistoryEntry] = []
            before: int | None = None
            while True:
                page = await alice.history_page(5, before=before)
                pages += page.entries
                if page.next is None:
                    break
                before = page.next
            assert pages == whole.entries
            exact = await alice.history_page(12)
            assert exact.next is None  # no empty page to fetch after the last
            only_bob = await alice.history_page(1000, counterparty="BOB")
            assert [e.amount for e in only_bob.entries] == list(range(11, 0, -1))
            late = whole.entries[0].at_ms
            assert (await alice.history_page(10, since_ms=late + 1)).entries == []
            assert (await alice.history_page(10, until_ms=late + 1)).entries == whole.entries[:10]


# --- shutdown of a logged-in session waiting for its next request (read with no scope) ---------


class ShutdownOnRead(trio.abc.Stream):
    """The server's side of a connection that, once armed, calls ``server.shutdown()`` as the
    next bytes from the client arrive: the read completes in the same scheduling pass as the
    shutdown, the race a server under load meets."""

    def __init__(self, inner: trio.abc.Stream, server: Server) -> None:
        self.inner, self.server, self.armed = inner, server, False

    async def send_all(self, data: Any) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> Any:
        data = await self.inner.receive_some(max_bytes)
        if self.armed and data:
            self.armed = False
            self.server.shutdown()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _until_closed(stream: trio.SSLStream[Any], conn: p.ClientConnection) -> list[object]:
    """Everything the server sends until it closes; the last item says how it closed."""
    seen: list[object] = []
    while True:
        event = conn.next_event()
        if event is p.CLOSED:
            return [*seen, "close_notify"]
        if not isinstance(event, p.Sentinel):
            seen.append(event)
            continue
        try:
            conn.receive_data(await stream.receive_some())
        except trio.BrokenResourceError as exc:
            return [*seen, exc]


@pytest.mark.parametrize("request_in_flight", [False, True])
async def test_shutdown_says_goodbye_to_an_idle_session_and_closes_politely(
    server: Server, client_ctx: ssl.SSLContext, request_in_flight: bool
) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    wrapped = ShutdownOnRead(server_side, server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, wrapped, "10.5.5.5")
        stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
        conn = p.ClientConnection()

        async def reply() -> object:
            while isinstance(event := conn.next_event(), p.Sentinel):
                conn.receive_data(await stream.receive_some())
            return event

        with trio.fail_after(5):
            for request in (p.Hello(1, 1), p.Register(2, "alice", "password1"),
                            p.Login(3, "alice", "password1", None, None)):  # fmt: skip
                await stream.send_all(conn.send_request(request))
                assert isinstance(await reply(), p.ReplyOk)
            await trio.testing.wait_all_tasks_blocked()  # alice's session waits for a request
            if request_in_flight:
                # The request arrives with the shutdown: it is refused, not dropped.
                wrapped.armed = True
                await stream.send_all(conn.send_request(p.ListOnline(4)))
            else:
                server.shutdown()
            seen = await _until_closed(stream, conn)
        nursery.cancel_scope.cancel()
    refused = [e for e in seen if isinstance(e, p.ReplyError)]
    assert [(e.id, e.code) for e in refused] == (
        [(4, "shutting_down")] if request_in_flight else []
    )
    assert isinstance(seen[-2], p.ServerClosing), seen
    assert seen[-1] == "close_notify", seen  # a polite TLS close, not a cut connection
