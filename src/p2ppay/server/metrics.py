"""What a running server counts, and a tiny HTTP responder that serves it to Prometheus.

Each :class:`ServerMetrics` has its own :class:`~prometheus_client.CollectorRegistry` (never the
process-global one), so tests can run several servers in one process. Gauges that describe the
server's state (connections, who is logged in) are read from the server when scraped, so nothing
has to keep them up to date; counters and histograms are fed by a few hooks in the server and by
the ledger's observer (called from the ledger's writer thread: prometheus-client is thread-safe).

The responder is a Trio task in the server's nursery (no daemon thread): one request line per
connection, read with a size limit and a deadline; ``GET /metrics`` gets the text format,
anything else 404; then the connection is closed. It is HTTP/1.0 and nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, final

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from p2ppay import __version__
from p2ppay.accepting import PatientListener
from p2ppay.logs import LimitLog


class Observed(Protocol):
    """What the metrics read from a server when scraped."""

    def connections_open(self) -> int: ...

    def sessions_logged_in(self, course: bool) -> int: ...

    def hash_jobs_waiting(self) -> int: ...


#: longest request line (and headers read with it) the responder takes, bytes
MAX_REQUEST: Final = 8192
#: seconds a scraper has to send its request line, and then to take the answer
REQUEST_TIMEOUT: Final = 5.0
#: connections to the metrics port at once; more are closed at once (Prometheus scrapes one
#: at a time)
MAX_SCRAPES: Final = 64

_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _snake(name: str) -> str:
    """``InsufficientFunds`` -> ``insufficient_funds`` (a ledger refusal as a label)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@final
class ServerMetrics:
    """One server's metrics, in one registry. Also the ledger's observer."""

    def __init__(self, server: Observed) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        Info("p2ppay", "The p2ppay server's version", registry=registry).info(
            {"version": __version__}
        )
        Gauge(
            "p2ppay_connections_open",
            "Connections open now (native and course, those in the TLS handshake included)",
            registry=registry,
        ).set_function(server.connections_open)
        sessions = Gauge(
            "p2ppay_sessions_logged_in",
            "Sessions logged in now, by dialect",
            ["dialect"],
            registry=registry,
        )
        sessions.labels("native").set_function(lambda: server.sessions_logged_in(False))
        sessions.labels("course").set_function(lambda: server.sessions_logged_in(True))
        Gauge(
            "p2ppay_hash_queue_length",
            "Password checks waiting for a hashing thread, from all addresses",
            registry=registry,
        ).set_function(server.hash_jobs_waiting)
        self.settles = Counter(
            "p2ppay_settles",
            "Settlements handed to the ledger, by outcome (ok, replayed, or the refusal)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "replayed"):  # exported as 0 before the first one
            self.settles.labels(outcome)
        self._settles_by_outcome: dict[str, Any] = {}
        self.settle_seconds = Histogram(
            "p2ppay_settle_seconds",
            "Seconds from handing a settlement to the ledger to its durable outcome",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_operations = Histogram(
            "p2ppay_ledger_batch_operations",
            "Operations in one ledger commit (group commit)",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "p2ppay_ledger_commit_seconds",
            "Seconds one ledger batch takes, from BEGIN to a durable COMMIT",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.login_failures = Counter(
            "p2ppay_login_failures",
            "Logins refused for an unknown account or a wrong password",
            registry=registry,
        )
        self.logins_throttled = Counter(
            "p2ppay_logins_throttled",
            "Logins refused because of too many failures (account or address)",
            registry=registry,
        )
        self.request_errors = Counter(
            "p2ppay_request_errors",
            "Native requests answered with an error, by operation and error code",
            ["op", "code"],
            registry=registry,
        )
        self.events_dropped = Counter(
            "p2ppay_events_dropped",
            "Events for a client that could not be delivered (its connection was gone)",
            registry=registry,
        )

    # -- hooks in the server --

    def request_failed(self, op: str, code: str) -> None:
        self.request_errors.labels(op, code).inc()
        if op == "login":
            if code == "auth_failed":
                self.login_failures.inc()
            elif code == "rate_limited":
                self.logins_throttled.inc()

    def event_dropped(self) -> None:
        self.events_dropped.inc()

    # -- the ledger's observer (called in the ledger's writer thread) --

    def committed(self, operations: int, seconds: float) -> None:
        self.batch_operations.observe(operations)
        self.commit_seconds.observe(seconds)

    def settled(self, outcome: str, seconds: float) -> None:
        # The labelled counter by outcome, looked up once: a regex and a locked lookup per
        # payment showed in the server's profile.
        counter = self._settles_by_outcome.get(outcome)
        if counter is None:
            counter = self._settles_by_outcome[outcome] = self.settles.labels(_snake(outcome))
        counter.inc()
        self.settle_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --- the responder ---------------------------------------------------------------------------

_NOT_FOUND: Final = b"not found: the metrics are at /metrics\n"


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_request_line(stream: trio.abc.Stream) -> bytes | None:
    """The first line, or None if it is too long, never ends or the peer leaves."""
    data = bytearray()
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return None
        data += chunk
    return bytes(data.split(b"\n", 1)[0]).rstrip(b"\r")


async def _answer(render: Callable[[], bytes], stream: trio.abc.Stream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            line = await _read_request_line(stream)
            if line is None:
                return
            parts = line.split()
            if len(parts) == 3 and parts[0] in (b"GET", b"HEAD") and parts[2].startswith(b"HTTP/"):
                path = parts[1].split(b"?", 1)[0]
                if path == b"/metrics":
                    body = render()
                    reply = _response("200 OK", CONTENT_TYPE_LATEST, body)
                    if parts[0] == b"HEAD":
                        reply = reply[: len(reply) - len(body)]
                else:
                    reply = _response("404 Not Found", "text/plain; charset=utf-8", _NOT_FOUND)
            else:
                reply = _response("400 Bad Request", "text/plain; charset=utf-8", b"bad request\n")
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    render: Callable[[], bytes],
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    limit_log: LimitLog,
) -> None:
    """Answer scrapes on ``listeners`` until cancelled (the server's nursery does that).

    Each connection's deadline starts when it is accepted, and past ``MAX_SCRAPES`` at once a
    connection is turned away at once: silent sockets can neither queue up nor hold a scrape
    back for longer than one deadline. Out of descriptors, accept waits (``limit_log`` says so
    once a minute)."""
    open_now = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_now
        if open_now >= MAX_SCRAPES:
            await trio.aclose_forcefully(stream)
            return
        open_now += 1
        try:
            await _answer(render, stream)
        finally:
            open_now -= 1

    advice = "raise the open-file limit, ulimit -n, or lower --max-connections"
    patient = [PatientListener(listener, limit_log, advice) for listener in listeners]
    await trio.serve_listeners(handle, patient)
