"""The /metrics responder's limits, and one registry per server."""

from __future__ import annotations

import ssl

import trio
import trio.testing

from p2ppay.ledger import SqliteLedger
from p2ppay.pki import Issuer
from p2ppay.server import Server
from p2ppay.server.metrics import MAX_REQUEST, REQUEST_TIMEOUT, _answer

from .conftest import closed_by_peer


def render() -> bytes:
    return b"p2ppay_test 1\n"


async def exchange(request: bytes) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, render, server)
        if request:
            await client.send_all(request)
        reply = bytearray()
        while chunk := await client.receive_some():
            reply += chunk
    return bytes(reply)


async def test_the_responder_answers_get_metrics_and_nothing_else() -> None:
    with trio.fail_after(5):
        ok = await exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.0 200 OK\r\n") and ok.endswith(b"\r\n\r\np2ppay_test 1\n")
        assert b"Content-Length: 14\r\n" in ok
        head = await exchange(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK") and head.endswith(b"\r\n\r\n")
        assert (await exchange(b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
        assert (await exchange(b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
        assert (await exchange(b"hello\n")).startswith(b"HTTP/1.0 400 ")


async def test_a_long_or_silent_request_is_closed_unanswered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    assert await exchange(b"G" * (MAX_REQUEST + 2)) == b""  # no line end within the limit:
    assert trio.current_time() == start  # closed at once, not at the deadline
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, render, server)
        start = trio.current_time()
        assert await closed_by_peer(client, within=REQUEST_TIMEOUT + 1)  # closed at the deadline
        assert trio.current_time() - start == REQUEST_TIMEOUT


async def test_each_server_has_its_own_registry(
    ledger: SqliteLedger, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    one, two = Server(ledger, server_ctx, issuer), Server(ledger, server_ctx, issuer)
    one.metrics.event_dropped()
    assert b"p2ppay_events_dropped_total 1.0" in one.metrics.render()
    assert b"p2ppay_events_dropped_total 0.0" in two.metrics.render()
