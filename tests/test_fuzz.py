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

from p2ppay import course
from p2ppay import protocol as p
from p2ppay.client import Client
from p2ppay.ledger import open_sqlite_ledger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig

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
            assert isinstance(event, p.Rejected | p._Request)
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
