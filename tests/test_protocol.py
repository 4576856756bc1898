"""The sans-I/O protocol, tested with bytes only: no network, no trio."""

from __future__ import annotations

import ast
import json
import uuid
from pathlib import Path

import pytest

import p2ppay.wire as p
from p2ppay.wire import CLOSED, NEED_DATA, ErrorCode, State

PID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def req(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def server_after_hello(*, logged_in: bool = False) -> p.ServerConnection:
    conn = p.ServerConnection()
    conn.receive_data(req(id=1, op="hello", version=1))
    hello = conn.next_event()
    assert isinstance(hello, p.Hello)
    conn.send_ok(hello, p.HelloResult(1, "test"))
    if logged_in:
        conn.receive_data(req(id=2, op="login", name="alice", password="pw"))
        login = conn.next_event()
        assert isinstance(login, p.Login)
        conn.send_ok(login, p.LoginResult("alice", 0, "10.0.0.1", None))
    return conn


def only_event(conn: p.ServerConnection, data: bytes) -> object:
    conn.receive_data(data)
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return event


# --- framing ---------------------------------------------------------------------------------


def test_line_buffer_splits_and_reassembles() -> None:
    buf = p.LineBuffer(100)
    buf.feed(b"ab")
    assert buf.next_line() is None
    buf.feed(b"c\nde\n\nf")
    assert buf.next_line() == b"abc"
    assert buf.next_line() == b"de"
    assert buf.next_line() == b""
    assert buf.next_line() is None
    assert buf.pending == 1


def test_line_buffer_byte_at_a_time() -> None:
    buf = p.LineBuffer(100)
    out = []
    for byte in b"one\ntwo\n":
        buf.feed(bytes([byte]))
        line = buf.next_line()
        if line is not None:
            out.append(line)
    assert out == [b"one", b"two"]


def test_over_long_line_is_refused_before_it_is_buffered_whole() -> None:
    buf = p.LineBuffer(1024)
    buf.feed(b"x" * 1000)
    assert buf.next_line() is None
    buf.feed(b"x" * 4096)  # no newline in sight, already past the limit
    with pytest.raises(p.RemoteProtocolError) as info:
        buf.next_line()
    assert info.value.code is ErrorCode.LINE_TOO_LONG
    assert buf.pending <= 1024 + 4096


def test_over_long_line_with_terminator_is_refused() -> None:
    buf = p.LineBuffer(10)
    buf.feed(b"0123456789ABC\n")
    with pytest.raises(p.RemoteProtocolError):
        buf.next_line()


def test_line_exactly_at_limit_is_fine() -> None:
    buf = p.LineBuffer(10)
    buf.feed(b"012345678\n")  # 9 bytes + terminator = 10
    assert buf.next_line() == b"012345678"


def test_max_line_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_line"):
        p.LineBuffer(1)


# --- decoding requests -----------------------------------------------------------------------


def test_every_op_round_trips() -> None:
    requests: list[p.Request] = [
        p.Hello(1, 1, "x"),
        p.Register(2, "alice", "password1"),
        p.Login(3, "alice", "pw", 9001, "-----BEGIN CERTIFICATE REQUEST-----"),
        p.Deposit(4, 500),
        p.ListOnline(5),
        p.Lookup(6, "bob"),
        p.Settle(7, PID, "bob", 30, "c2lnbmF0dXJl"),
        p.History(8, 10),
        p.History(10, 1000, before=77, counterparty="Bob", since_ms=0, until_ms=2**53),
        p.PaymentStatus(11, PID),
        p.Logout(9),
        p.Deposit(10, 500, PID),
        p.Settle(11, PID, "bob", 30, "c2lnbmF0dXJl", "lunch at noon"),
        p.MakeRequest(12, "bob", 30, "rent", 600),
        p.ListRequests(13),
        p.PayRequest(14, PID),
        p.DeclineRequest(15, PID),
        p.CancelRequest(16, PID),
        p.GetReceipt(17, PID),
        p.Passwd(18, "old one", "new password"),
    ]
    for request in requests:
        data = p.encode_request(request)
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        assert p.decode_request(data[:-1]) == request
    assert {p.op_of(r) for r in requests} == p.OPS


@pytest.mark.parametrize(
    ("line", "code", "message_part"),
    [
        (b'{"id": 1, "op": "deposit", "amount": 5', ErrorCode.BAD_REQUEST, "JSON"),
        (b'{"id": 1, "op": "deposit", "amount": "5"}', ErrorCode.BAD_REQUEST, "int"),
        (b'{"id": 1, "op": "deposit", "amount": 5.0}', ErrorCode.BAD_REQUEST, "int"),
        (b'{"id": 1, "op": "deposit", "amount": true}', ErrorCode.BAD_REQUEST, "int"),
        (b'{"id": 1, "op": "deposit", "amount": 0}', ErrorCode.BAD_REQUEST, ">= 1"),
        (b'{"id": 1, "op": "deposit", "amount": -3}', ErrorCode.BAD_REQUEST, ">= 1"),
        (b'{"id": 1, "op": "deposit", "amount": 10000000000000000}', ErrorCode.BAD_REQUEST, "<="),
        (b'{"id": 1, "op": "deposit", "amount": 5, "extra": 1}', ErrorCode.BAD_REQUEST, "extra"),
        (b'{"id": 1, "op": "deposit"}', ErrorCode.BAD_REQUEST, "amount"),
        (b'{"id": 1, "op": "transfer_all"}', ErrorCode.UNKNOWN_OP, "transfer_all"),
        (b'{"id": 1}', ErrorCode.BAD_REQUEST, "op"),
        (b"[1, 2]", ErrorCode.BAD_REQUEST, "object"),
        (b'"hello"', ErrorCode.BAD_REQUEST, "object"),
        (b'\xff\xfe{"id": 1}', ErrorCode.BAD_REQUEST, "UTF-8"),
        (
            b'{"id": 1, "op": "register", "name": "", "password": "longenough"}',
            ErrorCode.BAD_REQUEST,
            "name",
        ),
        (
            b'{"id": 1, "op": "register", "name": "a b", "password": "longenough"}',
            ErrorCode.BAD_REQUEST,
            "name",
        ),
        (
            b'{"id": 1, "op": "register", "name": "' + b"a" * 33 + b'", "password": "longenough"}',
            ErrorCode.BAD_REQUEST,
            "name",
        ),
        (
            b'{"id": 1, "op": "register", "name": "al\\nice", "password": "longenough"}',
            ErrorCode.BAD_REQUEST,
            "name",
        ),
        (
            b'{"id": 1, "op": "register", "name": "alice", "password": "short"}',
            ErrorCode.BAD_REQUEST,
            "password",
        ),
        (
            b'{"id": 1, "op": "login", "name": "alice", "password": "pw", "p2p_port": 80}',
            ErrorCode.BAD_REQUEST,
            "p2p_port",
        ),
        (
            b'{"id": 1, "op": "login", "name": "alice", "password": "pw", "p2p_port": 70000}',
            ErrorCode.BAD_REQUEST,
            "p2p_port",
        ),
        (
            b'{"id": 1, "op": "settle", "payment_id": "nope", "payee": "bob", "amount": 1}',
            ErrorCode.BAD_REQUEST,
            "UUID",
        ),
        (b'{"id": -1, "op": "list"}', ErrorCode.BAD_REQUEST, "id"),
        (b'{"id": "1", "op": "list"}', ErrorCode.BAD_REQUEST, "id"),
    ],
)
def test_malformed_requests_get_a_clear_error(
    line: bytes, code: ErrorCode, message_part: str
) -> None:
    result = p.decode_request(line)
    assert isinstance(result, p.Rejected)
    assert result.code is code
    assert message_part.lower() in result.message.lower()


def test_absent_optional_fields_are_left_out_and_explicit_nulls_still_read() -> None:
    """A deposit without an id and a settle without a memo are what servers before those
    fields understand; clients that send the fields as null are still understood."""
    assert p.encode_request(p.Deposit(1, 5)) == b'{"op":"deposit","id":1,"amount":5}\n'
    settle = p.encode_request(p.Settle(2, PID, "bob", 5, "c2ln"))
    assert b"memo" not in settle
    assert p.decode_request(b'{"op":"deposit","id":1,"amount":5,"deposit_id":null}') == (
        p.Deposit(1, 5)
    )
    line = settle[:-2] + b',"memo":null}'
    assert p.decode_request(line) == p.Settle(2, PID, "bob", 5, "c2ln")


def test_rejection_echoes_a_readable_id() -> None:
    result = p.decode_request(b'{"id": 42, "op": "deposit", "amount": "lots"}')
    assert isinstance(result, p.Rejected)
    assert result.id == 42
    result = p.decode_request(b'{"id": "x", "op": "deposit", "amount": 1}')
    assert isinstance(result, p.Rejected)
    assert result.id is None


# --- the server connection state machine -----------------------------------------------------


def test_hello_is_required_first() -> None:
    conn = p.ServerConnection()
    event = only_event(conn, req(id=1, op="list"))
    assert isinstance(event, p.Rejected)
    assert event.code is ErrorCode.HELLO_REQUIRED
    assert conn.state is State.AWAIT_HELLO


def test_authenticated_ops_need_login() -> None:
    conn = server_after_hello()
    assert conn.state is State.ANONYMOUS
    cases: list[tuple[str, dict[str, object]]] = [
        ("deposit", {"amount": 1}),
        ("list", {}),
        ("logout", {}),
        ("settle", {"payment_id": str(PID), "payee": "bob", "amount": 1, "acceptance": "c2ln"}),
    ]
    for op, extra in cases:
        event = only_event(conn, req(id=3, op=op, **extra))
        assert isinstance(event, p.Rejected), op
        assert event.code is ErrorCode.NOT_LOGGED_IN
        assert event.id == 3


def test_login_moves_state_only_when_it_succeeds() -> None:
    conn = server_after_hello()
    login = only_event(conn, req(id=2, op="login", name="alice", password="pw"))
    assert isinstance(login, p.Login)
    error = conn.send_error(login.id, ErrorCode.AUTH_FAILED, "no")
    assert json.loads(error) == {
        "id": 2,
        "ok": False,
        "error": {"code": "auth_failed", "message": "no"},
    }
    assert conn.state is State.ANONYMOUS
    data = conn.send_ok(login, p.LoginResult("alice", 7, "10.0.0.1", None))
    assert json.loads(data) == {
        "id": 2,
        "ok": True,
        "result": {
            "name": "alice",
            "balance": 7,
            "ip": "10.0.0.1",
            "port": None,
            "certificate": None,
            "peer_ca": None,
            "request_news": [],
        },
    }
    assert conn.state is State.AUTHENTICATED  # type: ignore[comparison-overlap]


def test_already_logged_in_and_logout() -> None:
    conn = server_after_hello(logged_in=True)
    event = only_event(conn, req(id=5, op="login", name="bob", password="pw"))
    assert isinstance(event, p.Rejected)
    assert event.code is ErrorCode.ALREADY_LOGGED_IN
    logout = only_event(conn, req(id=6, op="logout"))
    assert isinstance(logout, p.Logout)
    conn.send_ok(logout, p.LogoutResult())
    assert conn.state is State.ANONYMOUS


def test_local_protocol_errors() -> None:
    conn = server_after_hello()
    with pytest.raises(p.LocalProtocolError):
        conn.send_ok(p.Deposit(1, 5), p.BalanceResult(5))  # not logged in
    conn = server_after_hello(logged_in=True)
    with pytest.raises(p.LocalProtocolError):
        conn.send_ok(p.Deposit(1, 5), p.ListResult(5, []))  # wrong result type
    anonymous = server_after_hello()
    with pytest.raises(p.LocalProtocolError):
        anonymous.send_event(p.PaymentReceived(PID, "bob", 1, 1))


def test_crlf_blank_lines_and_pipelining() -> None:
    conn = server_after_hello(logged_in=True)
    conn.receive_data(b'\n\r\n{"id": 7, "op": "list"}\r\n{"id": 8, "op": "history"}\n')
    first = conn.next_event()
    second = conn.next_event()
    assert isinstance(first, p.ListOnline) and first.id == 7
    assert isinstance(second, p.History) and second.limit == 50
    assert (second.before, second.counterparty, second.since_ms, second.until_ms) == (None,) * 4
    assert conn.next_event() is NEED_DATA


def test_eof_cleanly_and_mid_line() -> None:
    conn = server_after_hello()
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    conn = server_after_hello()
    conn.receive_data(b'{"id": 1, "op"')
    conn.receive_data(b"")
    with pytest.raises(p.RemoteProtocolError):
        conn.next_event()


def test_server_connection_refuses_an_over_long_line() -> None:
    conn = p.ServerConnection(max_line=64)
    conn.receive_data(b"{" * 200)
    with pytest.raises(p.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.LINE_TOO_LONG


def test_a_rejected_line_leaves_the_connection_usable() -> None:
    conn = server_after_hello(logged_in=True)
    conn.receive_data(b'garbage\n{"id": 9, "op": "list"}\n')
    assert isinstance(conn.next_event(), p.Rejected)
    event = conn.next_event()
    assert isinstance(event, p.ListOnline) and event.id == 9


# --- the client connection -------------------------------------------------------------------


def test_client_matches_replies_by_id_and_decodes_results() -> None:
    client = p.ClientConnection()
    server = server_after_hello(logged_in=True)
    out = client.send_request(p.Settle(11, PID, "bob", 30, "c2ln")) + client.send_request(
        p.ListOnline(12)
    )
    server.receive_data(out)
    settle, listing = server.next_event(), server.next_event()
    assert isinstance(settle, p.Settle) and isinstance(listing, p.ListOnline)
    # Replies and an event, in another order than the requests.
    client.receive_data(
        server.send_ok(listing, p.ListResult(70, [p.Presence("bob", "10.0.0.2", 9002)]))
        + server.send_event(p.PaymentReceived(PID, "carol", 5, 75))
        + server.send_error(settle.id, ErrorCode.INSUFFICIENT_FUNDS, "poor")
    )
    first, second, third = client.next_event(), client.next_event(), client.next_event()
    assert first == p.ReplyOk(12, "list", p.ListResult(70, [p.Presence("bob", "10.0.0.2", 9002)]))
    assert second == p.PaymentReceived(PID, "carol", 5, 75)
    assert third == p.ReplyError(11, "insufficient_funds", "poor")
    assert client.next_event() is NEED_DATA


def test_client_refuses_reusing_a_pending_id() -> None:
    client = p.ClientConnection()
    client.send_request(p.ListOnline(1))
    with pytest.raises(p.LocalProtocolError):
        client.send_request(p.ListOnline(1))


def test_client_drops_replies_it_gave_up_on() -> None:
    client = p.ClientConnection()
    client.send_request(p.ListOnline(1))
    client.forget(1)
    client.receive_data(p.encode_ok(1, p.ListResult(0, [])))
    assert client.next_event() is NEED_DATA


def test_client_rejects_garbage_from_the_server() -> None:
    client = p.ClientConnection()
    client.receive_data(b"not json\n")
    with pytest.raises(p.RemoteProtocolError):
        client.next_event()


# --- nesting depth, huge values, canonical ids and names ------------------------------------

DEEP = b"[" * 1500 + b"]" * 1500  # once a RecursionError in every decoder


def test_deep_nesting_is_refused_by_every_json_decoder_before_decoding() -> None:
    conn = server_after_hello()
    event = only_event(conn, DEEP + b"\n")
    assert event == p.Rejected(None, ErrorCode.BAD_REQUEST, "JSON nested deeper than 32 levels")
    # the connection stays usable
    assert isinstance(
        only_event(conn, req(id=5, op="register", name="a", password="x" * 8)), p.Register
    )
    with pytest.raises(p.RemoteProtocolError, match="nested deeper than 32"):
        p.decode_peer_message(DEEP)
    client = p.ClientConnection()
    client.send_request(p.ListOnline(1))
    client.receive_data(b'{"id":1,"ok":true,"result":' + DEEP + b"}\n")
    with pytest.raises(p.RemoteProtocolError, match="nested deeper than 32"):
        client.next_event()


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 33 + b"]" * 33,
        b"{" + b'"a":{' * 32 + b"}" * 33,
        b"[" * 60_000,  # never closed
        b'{"id":' + b"[" * 40 + b"]" * 40 + b',"op":"list"}',  # before the tag
        b"[" * 20 + b'"]]]"' + b"[" * 13 + b"]" * 33,
    ],
)
def test_too_deep(line: bytes) -> None:
    assert p.too_deep(line, 32)
    result = p.decode_request(line)
    assert isinstance(result, p.Rejected) and "nested deeper than 32" in result.message


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 32 + b"]" * 32,
        b'{"a":"' + b"[" * 100 + b'"}',  # brackets inside a string do not count
        b'{"a":"\\"' + b"[" * 10 + b',"b":"\\"' + b"[" * 100 + b'"}',  # nor after escapes
        b"[]" * 1000,  # many brackets, shallow
        b'"' + b'\\"[' * 10_000,  # an unterminated string: linear, not catastrophic
    ],
)
def test_not_too_deep(line: bytes) -> None:
    assert not p.too_deep(line, 32)


def test_max_depth_is_configurable_within_bounds() -> None:
    conn = p.ServerConnection(max_depth=2)
    conn.receive_data(b'{"id":1,"op":"hello","version":[[1]]}\n')
    event = conn.next_event()
    assert isinstance(event, p.Rejected) and "deeper than 2 levels" in event.message
    for bad in (0, p.MAX_DEPTH_CAP + 1):
        with pytest.raises(ValueError, match="max_depth"):
            p.ServerConnection(max_depth=bad)
        with pytest.raises(ValueError, match="max_depth"):
            p.ClientConnection(max_depth=bad)


@pytest.mark.parametrize(
    "line",
    [
        b'{"id":' + b"9" * 5000 + b',"op":"list"}',
        b'{"id":1,"op":"deposit","amount":' + b"9" * 5000 + b"}",
        b'{"id":1,"op":"deposit","amount":1e999999}',
        b'{"id":1,"op":"deposit","amount":-' + b"9" * 400 + b"}",
        b'{"id":1,"op":"register","name":"' + b"a" * 60_000 + b'","password":"12345678"}',
        b'{"id":1,"op":"hello","version":1,"client":"' + b"\\u0000" * 10_000 + b'"}',
    ],
)
def test_huge_numbers_and_long_strings_get_a_clear_error(line: bytes) -> None:
    result = p.decode_request(line)
    assert isinstance(result, p.Rejected) and result.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "text",
    [
        "12345678-1234-5678-1234-56781234567A",  # upper case
        "0A1B2C3D-4E5F-4A6B-8C7D-9E0FABCDEF12",
        "12345678123456781234567812345678",  # no dashes
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        " 12345678-1234-5678-1234-567812345678",
    ],
)
def test_payment_ids_must_be_canonical(text: str) -> None:
    settle = req(id=3, op="settle", payment_id=text, payee="bob", amount=1, acceptance="AA==")
    result = p.decode_request(settle)
    assert isinstance(result, p.Rejected) and result.code is ErrorCode.BAD_REQUEST
    assert "canonical" in result.message
    offer = json.dumps(
        {"type": "offer", "payment_id": text, "payer": "a", "payee": "b", "amount": 1}
    ).encode()
    with pytest.raises(p.RemoteProtocolError, match="canonical"):
        p.decode_peer_message(offer)
    client = p.ClientConnection()
    client.receive_data(
        json.dumps(
            {
                "event": "payment_received",
                "payment_id": text,
                "payer": "a",
                "amount": 1,
                "balance": 1,
            }
        ).encode()
        + b"\n"
    )
    with pytest.raises(p.RemoteProtocolError, match="canonical"):
        client.next_event()


def test_a_canonical_payment_id_decodes_to_an_ordinary_uuid() -> None:
    settle = req(id=3, op="settle", payment_id=str(PID), payee="bob", amount=1, acceptance="AA==")
    result = p.decode_request(settle)
    assert isinstance(result, p.Settle)
    assert result.payment_id == PID and hash(result.payment_id) == hash(PID)
    assert isinstance(result.payment_id, uuid.UUID) and str(result.payment_id) == str(PID)
    assert str(PID).encode() in p.encode_request(result)
    assert p.decode_request(p.encode_request(result)) == result


@pytest.mark.parametrize("name", [".", "..", "-", "_", "._-", "-bob", ".hidden", "_x", "a" * 33])
def test_names_must_start_with_a_letter_or_digit(name: str) -> None:
    result = p.decode_request(req(id=1, op="register", name=name, password="long enough"))
    assert isinstance(result, p.Rejected) and result.code is ErrorCode.BAD_REQUEST
    assert "name" in result.message


@pytest.mark.parametrize("name", ["a", "0day", "Alice", "a.b-c_d", "x" * 32, "9"])
def test_valid_names(name: str) -> None:
    assert isinstance(p.decode_request(req(id=1, op="lookup", name=name)), p.Lookup)


# --- layering --------------------------------------------------------------------------------


def test_the_sans_io_layer_imports_no_io() -> None:
    """The wire package (the native protocol, the course codec, names, constraints, errors)
    never imports anything that does I/O."""
    package = Path(p.__file__).parent
    files = [*package.glob("*.py")]
    assert {f.stem for f in files} >= {"names", "constraints", "errors", "course", "framing"}
    assert len(files) >= 10
    for path in files:
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        assert not imported & {"trio", "sqlite3", "socket", "ssl", "asyncio"}, (path, imported)


def test_every_op_is_declared_once_and_legal_somewhere() -> None:
    assert set(p.OP_TYPES) == p.OPS == {op for _, op in p.TRANSITIONS}
    for op, (request, result) in p.OP_TYPES.items():
        assert p.op_of(request) == op and p.RESULT_TYPES[op] is result


def test_history_filters_on_the_wire() -> None:
    # "with" names the counterparty on the wire; a plain request stays as older servers read it.
    assert p.encode_request(p.History(1, 5)) == b'{"op":"history","id":1,"limit":5}\n'
    line = b'{"id": 2, "op": "history", "with": "bob", "before": 9, "since_ms": 5, "until_ms": 6}'
    assert p.decode_request(line) == p.History(2, 50, 9, "bob", 5, 6)
    for bad in (
        b'{"id": 3, "op": "history", "before": 0}',
        b'{"id": 3, "op": "history", "with": "no one"}',
        b'{"id": 3, "op": "history", "since_ms": -1}',
        b'{"id": 3, "op": "history", "counterparty": "bob"}',
        b'{"id": 3, "op": "payment_status", "payment_id": "12345678123456781234567812345678"}',
    ):
        rejected = p.decode_request(bad)
        assert isinstance(rejected, p.Rejected) and rejected.code == ErrorCode.BAD_REQUEST, bad
