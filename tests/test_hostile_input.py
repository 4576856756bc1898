"""Deeply nested JSON, sent over real connections to every decoder in p2ppay.

`[` x 1,500 + `]` x 1,500 once made msgspec raise RecursionError, which only DecodeError
handlers did not catch: it killed a payee's client, a payer's client, and closed server sessions
with a traceback at ERROR. Each decoder must answer it with the protocol's own error or a polite
close, log no ERROR, and leave everyone else served."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.client.connection import Client, ConnectionLost
from p2ppay.client.wallet import PaymentFailed
from p2ppay.server import Server

from .conftest import SERVER_NAME, Connect, Open, raw_tls, registered
from .test_p2p import next_of

DEEP = b"[" * 1500 + b"]" * 1500
DEEP_OBJECTS = b'{"a":' * 650 + b"1" + b"}" * 650  # within the peers' 4 KiB lines
UNCLOSED = b"[" * 60_000  # stays under the server's 64 KiB line limit


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything was logged at ERROR or with a traceback."""
    caplog.set_level(logging.DEBUG)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def read_line(stream: trio.abc.Stream, lines: p.LineBuffer) -> bytes | None:
    """The next line from ``stream``, or None once it is closed."""
    while (line := lines.next_line()) is None:
        try:
            chunk = await stream.receive_some()
        except trio.BrokenResourceError:
            return None
        if not chunk:
            return None
        lines.feed(chunk)
    return line


@pytest.mark.usefixtures("no_errors_logged")
async def test_the_server_session_answers_deep_nesting_and_goes_on(
    server: Server, client_ctx: ssl.SSLContext, connect: Connect
) -> None:
    async with raw_tls(server, client_ctx, "10.66.6.6") as stream:
        lines = p.LineBuffer(1 << 20)
        with trio.fail_after(10):
            for bad in (DEEP, DEEP_OBJECTS, UNCLOSED, b'{"id":' + DEEP + b',"op":"list"}'):
                await stream.send_all(bad + b"\n")
                reply = p.ClientConnection()
                reply.receive_data((await read_line(stream, lines) or b"") + b"\n")
                event = reply.next_event()
                assert isinstance(event, p.ReplyError), event
                assert event.id is None and event.code == "bad_request", event
                assert "nested deeper than 32" in event.message
            # The same connection still works, and so does everyone else's.
            await stream.send_all(b'{"id":1,"op":"hello","version":1}\n')
            ok = await read_line(stream, lines)
            assert ok is not None and b'"ok":true' in ok
            async with connect() as other:
                await registered(other, "other", deposit=7)
                assert (await other.list()).balance == 7
    assert not server.sessions


@pytest.mark.usefixtures("no_errors_logged")
async def test_the_course_codec_answers_deep_nesting(server: Server, connect: Connect) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_course_connection, server_side, "10.7.7.7")
        with trio.fail_after(10):
            await client_side.send_all(DEEP + b"\n")
            got = b""
            while chunk := await client_side.receive_some():
                got += chunk
            # Longer than a course message may be: the format error, then a close.
            assert got == b"230 Input format error\n"
            async with connect() as other:
                await registered(other, "other")


@pytest.mark.usefixtures("no_errors_logged")
async def test_the_payee_listener_declines_deep_nesting_and_goes_on(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            assert alice.identity is not None and bob.p2p_port is not None
            for bad in (DEEP, DEEP_OBJECTS):
                tcp = await trio.open_tcp_stream("127.0.0.1", bob.p2p_port)
                stream = trio.SSLStream(tcp, alice.identity.dialer_context)
                lines = p.LineBuffer()
                await stream.send_all(bad + b"\n")
                answer = await read_line(stream, lines)
                assert answer is not None
                decline = p.decode_peer_message(answer)
                assert isinstance(decline, p.Decline) and decline.payment_id is None
                assert "nested deeper than 32" in decline.reason
                assert await read_line(stream, lines) is None  # then a close
                await trio.aclose_forcefully(stream)
            # bob's client is alive and takes a proper payment.
            assert (await alice.pay("bob", 5)).balance == 95
            assert (await next_of(bob, p.PaymentReceived)).amount == 5


@pytest.mark.usefixtures("no_errors_logged")
async def test_the_payer_survives_a_payee_answering_with_deep_nesting(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100) as alice,
            open_wallet("mallory") as mallory,
            open_wallet("bob") as bob,
        ):
            # mallory's real listener goes; a hostile one with her certificate takes its port.
            assert mallory.identity is not None
            port = mallory.p2p_port
            assert port is not None
            mallory.stop_listening()
            await trio.testing.wait_all_tasks_blocked()
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            context = mallory.identity.listener_context
            offers: list[bytes] = []

            async def hostile(transport: trio.SocketStream) -> None:
                stream = trio.SSLStream(transport, context, server_side=True)
                try:
                    offer = await read_line(stream, p.LineBuffer())
                    offers.append(offer or b"")
                    await stream.send_all(DEEP + b"\n")
                    await read_line(stream, p.LineBuffer())  # until the payer hangs up
                except trio.BrokenResourceError:
                    pass
                finally:
                    await trio.aclose_forcefully(stream)

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, hostile, listeners)
                with pytest.raises(PaymentFailed) as info:
                    await alice.pay("mallory", 10)
                nursery.cancel_scope.cancel()
            assert info.value.code == "bad_answer", info.value
            assert "nested deeper than 32" in info.value.message
            assert len(offers) == 1 and b'"type":"offer"' in offers[0]
            # alice's client is alive: nothing moved, and she still pays others.
            assert await alice.balance() == 100
            assert (await alice.pay("bob", 5)).balance == 95
            assert (await next_of(bob, p.PaymentReceived)).amount == 5


async def hostile_server(stream: trio.abc.Stream, reply_to: str) -> None:
    """Answers the client's hello (or, after a proper hello, its next request) with DEEP."""
    lines = p.LineBuffer()
    hello = await read_line(stream, lines)
    assert hello is not None and b'"op":"hello"' in hello
    if reply_to == "list":
        await stream.send_all(p.encode_ok(1, p.HelloResult(1, "hostile")))
        assert await read_line(stream, lines) is not None
    await stream.send_all(DEEP + b"\n")
    await read_line(stream, lines)


async def use_client(tls: trio.abc.Stream) -> None:
    async with Client.over(tls) as client:
        await client.list()


@pytest.mark.usefixtures("no_errors_logged")
@pytest.mark.parametrize("reply_to", ["hello", "list"])
async def test_the_client_survives_a_server_sending_deep_nesting(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, reply_to: str
) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    hostile = trio.SSLStream(server_side, server_ctx, server_side=True)
    tls = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile_server, hostile, reply_to)
            # The client's own error, raised as such: not a RecursionError, not in a group.
            with pytest.raises(ConnectionLost, match="nested deeper than"):
                await use_client(tls)
            nursery.cancel_scope.cancel()


async def test_a_session_ending_in_deep_nesting_is_not_an_internal_error(
    server: Server, client_ctx: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported symptom itself: no "internal error; connection closed" per line."""
    async with raw_tls(server, client_ctx, "10.66.6.7") as stream:
        with trio.fail_after(10):
            await stream.send_all(b"".join(DEEP + b"\n" for _ in range(20)))
            lines = p.LineBuffer(1 << 20)
            for _ in range(20):
                line = await read_line(stream, lines)
                assert line is not None and b"bad_request" in line
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
