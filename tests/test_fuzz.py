"""Fuzzing with Hypothesis: decoders and a live server session fed arbitrary input.

Bounded in the normal suite; ``nox -s fuzz`` runs the same tests with many more examples
(``HYPOTHESIS_PROFILE=fuzz``)."""

from __future__ import annotations

import json
import logging
import math
import ssl

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ppay import wire as p
from p2ppay.client.connection import Client
from p2ppay.ledger import open_sqlite_ledger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig
from p2ppay.wire import course

from .conftest import FAST_SCRYPT, SERVER_NAME, registered

NO_DEADLINE = settings(deadline=None, suppress_health_check=list(HealthCheck))


@given(chunks=st.lists(st.binary(max_size=300), max_size=10))
def test_server_decoder_yields_only_defined_outcomes(chunks: list[bytes]) -> None:
    conn = p.ServerConnection(max_line=256)
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            fatal: p.ErrorCode | None = None
            try:
                event = conn.next_event()
            except p.RemoteProtocolError as exc:
                fatal = exc.code
            if fatal is not None:
                assert fatal in (p.ErrorCode.LINE_TOO_LONG, p.ErrorCode.BAD_REQUEST)
                return
            if event is p.NEED_DATA:
                break
            if event is p.CLOSED:
                return
            assert isinstance(event, p.Rejected | p.RequestBase)
            if isinstance(event, p.Rejected):
                assert isinstance(event.code, p.ErrorCode) and event.message


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from([*sorted(p.OPS), "nope"])},
    optional={
        "id": st.integers(-5, 2**60) | json_value,
        "version": json_value,
        "name": st.text(max_size=40) | json_value,
        "password": st.text(max_size=20),
        "amount": st.integers() | json_value,
        "payment_id": st.uuids().map(str) | json_value,
        "payee": st.text(max_size=10),
        "acceptance": st.text(max_size=10),
        "p2p_port": st.integers(),
        "limit": json_value,
        "csr": st.text(max_size=30),
    },
)


# What a recursive strategy with a few leaves never reaches: JSON nested hundreds or thousands
# deep (once a RecursionError in every decoder), never closed, strings of many kilobytes, and
# numbers far outside 64 bits. Built as bytes: json.dumps itself cannot nest that deep.
deep_json = st.one_of(
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
    st.integers(1, 3000).map(lambda n: b"[{" * n),  # never closed
    st.tuples(st.integers(1, 1500), st.integers(0, 40)).map(
        lambda t: b'["' + b"[" * t[1] + b'",' + b"[" * t[0] + b"]" * t[0] + b"]"
    ),
)
long_string = st.one_of(
    st.text(min_size=1000, max_size=20_000).map(lambda t: json.dumps(t).encode()),
    st.integers(1000, 20_000).map(lambda n: b'"' + b'\\"[' * n),  # never closed
)
huge_number = st.one_of(
    st.integers(min_value=2**64, max_value=10**400).map(lambda n: str(n).encode()),
    st.integers(20, 6000).map(lambda n: b"-" + b"9" * n),
    st.sampled_from([b"1e999999", b"-1e999999", b"1e-999999", b"1" + b"0" * 5000 + b".5"]),
)
hostile_value = st.one_of(deep_json, long_string, huge_number)
hostile_line = st.one_of(
    hostile_value,
    st.builds(
        lambda op, field, value: b'{"id":1,"op":"%s","%s":%s}' % (op.encode(), field, value),
        st.sampled_from(sorted(p.OPS)),
        st.sampled_from([b"id", b"name", b"amount", b"payment_id", b"version", b"limit"]),
        hostile_value,
    ),
    st.builds(
        lambda field, value: b'{"%s":%s,"type":"offer"}' % (field, value),
        st.sampled_from([b"payment_id", b"payer", b"amount", b"reason"]),
        hostile_value,
    ),
    st.builds(
        lambda field, value: b'{"id":1,"%s":%s,"ok":true}' % (field, value),
        st.sampled_from([b"result", b"error", b"event", b"id"]),
        hostile_value,
    ),
)


@given(line=hostile_line)
def test_every_json_decoder_answers_hostile_json_with_its_own_error(line: bytes) -> None:
    request = p.decode_request(line)
    if isinstance(request, p.Rejected):
        assert request.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP)
    conn = p.ServerConnection(max_line=len(line) + 2)
    conn.receive_data(line + b"\n")
    assert isinstance(conn.next_event(), p.Rejected | p.RequestBase)
    codes: list[p.ErrorCode] = []
    try:
        p.decode_peer_message(line)
    except p.RemoteProtocolError as exc:
        codes.append(exc.code)
    client = p.ClientConnection(max_line=len(line) + 2)
    client.send_request(p.ListOnline(1))
    client.receive_data(line + b"\n")
    try:
        client.next_event()
    except p.RemoteProtocolError as exc:
        codes.append(exc.code)
    assert set(codes) <= {p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP}
    for message in course.CourseDecoder().receive_chunk(line):
        assert isinstance(message, course.CourseMessage)


@given(messages=st.lists(request_like, max_size=10))
def test_request_like_objects_decode_or_get_a_clear_error(
    messages: list[dict[str, object]],
) -> None:
    for message in messages:
        line = json.dumps(message).encode()
        result = p.decode_request(line)
        if isinstance(result, p.Rejected):
            assert result.code in (p.ErrorCode.BAD_REQUEST, p.ErrorCode.UNKNOWN_OP)
        else:
            assert p.op_of(result) == message["op"]


@given(data=st.binary(max_size=600))
def test_peer_and_course_decoders_never_crash(data: bytes) -> None:
    try:
        peer_message: object = p.decode_peer_message(data)
    except p.RemoteProtocolError as exc:
        peer_message = exc.code
    assert isinstance(
        peer_message, p.Offer | p.Accept | p.Decline | p.NotSettled
    ) or peer_message in (
        p.ErrorCode.BAD_REQUEST,
        p.ErrorCode.UNKNOWN_OP,
    )
    decoder = course.CourseDecoder(max_message=128)
    for message in decoder.receive_chunk(data):
        assert isinstance(message, course.CourseMessage)


line = st.one_of(
    request_like.map(lambda m: json.dumps(m).encode() + b"\n"),
    st.binary(max_size=200).map(lambda b: b + b"\n"),
    st.binary(max_size=200),
    hostile_line.map(lambda b: b + b"\n"),
)


@NO_DEADLINE
@given(session=st.lists(line, min_size=1, max_size=12))
async def test_a_session_fed_arbitrary_input_hurts_nobody(
    session: list[bytes],
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.clear()
    async with open_sqlite_ledger(":memory:") as ledger:
        server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT, max_line=1024))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run_in_memory)
            # The hostile session: a TLS client that sends whatever it was given.
            hostile, server_side = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_connection, server_side, "10.66.6.6")
            stream = trio.SSLStream(hostile, client_ctx, server_hostname=SERVER_NAME)
            with trio.fail_after(10):
                try:
                    for chunk in session:
                        await stream.send_all(chunk)
                    await stream.send_all(b"\n")
                except trio.BrokenResourceError:
                    pass  # the server hung up on it: allowed
            # A well-behaved client is served all the while.
            good, good_server = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_connection, good_server, "10.0.0.1")
            tls = trio.SSLStream(good, client_ctx, server_hostname=SERVER_NAME)
            with trio.fail_after(10):
                async with Client.over(tls, request_timeout=math.inf) as client:
                    await registered(client, "well-behaved", deposit=5)
                    assert (await client.list()).balance == 5
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
        audit = await ledger.audit()
        assert audit.conserved
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
