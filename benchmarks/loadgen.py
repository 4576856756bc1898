"""The benchmark's load generator processes: strict request -> reply over many connections, one
outstanding request each, in a plain ``epoll`` loop with non-blocking ``ssl`` sockets.

Why not Trio here: a Trio client's ``SSLStream`` costs about as much CPU per round trip as the
server it measures, so a Python generator in one process starved the echo baseline (issue 12).
This loop costs a fraction of that, and :mod:`p2ppay.bench` runs several of them as separate
processes. Each process: reads its spec (one JSON line) on stdin, connects and logs in, prints
``ready``, waits for ``go``, runs for the spec's seconds and prints one JSON line of results
(operations, latencies in microseconds, its own CPU seconds and wall time, and how many
connections ran out of requests early).

A spec gives the server's ``port``, or ``ports``: connection i (in the order of ``names``, or
of ``connections``) then connects to ``ports[i % len(ports)]``, which splits the connections
evenly over several nodes. With ``warmup`` seconds, the load first runs that long uncounted,
every reply is awaited, and the process says ``ready`` and waits for ``go`` once more before
the counted run: the server's caches and plans are warm, and nothing is in flight when the
benchmark starts its clocks.

Phases (``spec["phase"]``):

- ``echo``: a line out, the same line back (the baseline server);
- ``list``: native ``list`` requests of logged-in users;
- ``settle``: native ``settle`` of 1 unit to another user of the same process, with the
  payee's acceptance signed before ``go`` (``payment_received`` events are read and skipped);
  ``budget`` acceptances per connection, after which that connection stops;
- ``course_list``: course-dialect ``List`` of logged-in course users (plain TCP).
"""

from __future__ import annotations

import base64
import json
import random
import resource
import selectors
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, Final, final

from p2ppay.client.peer import PeerKey
from p2ppay.pki import sign_acceptance, sign_acceptance_v1

PASSWORD: Final = "benchmark password"
#: the phases this module drives
PHASES: Final = frozenset({"echo", "list", "settle", "course_list"})


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@final
class _Conn:
    """One connection: a blocking set-up phase, then non-blocking request/reply."""

    __slots__ = ("buf", "make", "next_id", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.next_id = 10
        self.sent_at = 0.0
        self.make: Callable[[_Conn], bytes] = lambda c: b""

    # -- set-up (blocking) --

    def line(self) -> bytes:
        while (i := self.buf.find(b"\n")) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed during set-up")
            self.buf += data
        out = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return out

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply: dict[str, Any] = json.loads(self.line())
            if "event" in reply:
                continue
            if not reply.get("ok"):
                raise RuntimeError(f"{message['op']} failed: {reply}")
            return reply

    def course_roster(self) -> None:
        """Read one course login/List reply (balance, key, N, N lines)."""
        self.line(), self.line()
        for _ in range(int(self.line())):
            self.line()


def _connect(port: int, ctx: ssl.SSLContext | None) -> _Conn:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is None:
        return _Conn(raw)
    return _Conn(ctx.wrap_socket(raw, server_hostname="localhost"))


def _reply_end_line(buf: bytearray) -> int:
    """Where the first reply (not an event) in ``buf`` ends (after its newline), or -1; event
    lines before it are dropped from ``buf``."""
    while (i := buf.find(b"\n")) >= 0:
        if buf.startswith(b'{"event"'):
            del buf[: i + 1]
            continue
        return i + 1
    return -1


def _reply_end_roster(buf: bytearray) -> int:
    """Where a course roster (balance, key, N, N lines) in ``buf`` ends, or -1."""
    end = 0
    for _ in range(3):
        end = buf.find(b"\n", end) + 1
        if end == 0:
            return -1
    third = buf.rfind(b"\n", 0, end - 1) + 1
    n = int(buf[third : end - 1])
    for _ in range(n):
        end = buf.find(b"\n", end) + 1
        if end == 0:
            return -1
    return end


def port_of(spec: dict[str, Any], i: int) -> int:
    """The port connection ``i`` of ``spec`` connects to: ``port``, or ``ports`` in turn."""
    ports: list[int] = spec.get("ports") or [spec["port"]]
    return ports[i % len(ports)]


def _set_up(spec: dict[str, Any]) -> tuple[list[_Conn], Callable[[bytearray], int]]:
    phase = spec["phase"]
    ctx: ssl.SSLContext | None = None
    if phase != "course_list":
        ctx = ssl.create_default_context(cafile=spec["ca"])
    conns: list[_Conn] = []
    if phase == "echo":
        for i in range(spec["connections"]):
            c = _connect(port_of(spec, i), ctx)
            c.make = lambda c: b'{"id": 1, "op": "list"}\n'
            conns.append(c)
        return conns, _reply_end_line
    if phase == "course_list":
        for i, name in enumerate(spec["names"]):
            c = _connect(port_of(spec, i), None)
            c.sock.sendall(f"REGISTER#{name}\n".encode())
            c.line()  # 100 OK, or 210 FAIL if it exists from an earlier round: either will do
            c.sock.sendall(f"{name}#{spec['listed_port']}\n".encode())
            c.course_roster()
            c.make = lambda c: b"List\n"
            conns.append(c)
        return conns, _reply_end_roster
    names: list[str] = spec["names"]
    keys: dict[str, PeerKey] = {}
    for i, name in enumerate(names):
        c = _connect(port_of(spec, i), ctx)
        c.request({"op": "hello", "id": 1, "version": 1})
        login: dict[str, Any] = {"op": "login", "id": 2, "name": name, "password": PASSWORD}
        if phase == "settle":
            keys[name] = PeerKey()
            login["csr"] = keys[name].csr(name)
        c.request(login)
        conns.append(c)
    if phase == "list":
        for c in conns:
            c.make = _list_request
        return conns, _reply_end_line
    if phase != "settle":
        raise ValueError(f"unknown phase {phase!r}")
    # Sign the acceptances up front: the generator should not be what is measured. Format 1
    # (``"acceptance_format": 1``) is what a server from before memos understands (and every
    # server since, for a payment without a memo): for comparing against an older checkout.
    rng = random.Random(spec.get("seed", 42))
    budget: int = spec["budget"]
    sign = sign_acceptance_v1 if spec.get("acceptance_format", 2) == 1 else sign_acceptance
    for i, (name, c) in enumerate(zip(names, conns, strict=True)):
        queue: list[bytes] = []
        for _ in range(budget):
            payee = names[(i + rng.randrange(1, len(names))) % len(names)]
            pid = str(uuid.uuid4())
            sig = base64.b64encode(sign(keys[payee].key, pid, name, payee, 1)).decode()
            queue.append(
                b'{"op":"settle","id":%d,"payment_id":"%s","payee":"%s","amount":1,'
                b'"acceptance":"%s"}\n'
                % (len(queue) + 10, pid.encode(), payee.encode(), sig.encode())
            )
        c.make = _from_queue(queue)
    return conns, _reply_end_line


def _list_request(c: _Conn) -> bytes:
    c.next_id += 1
    return b'{"op":"list","id":%d}\n' % c.next_id


def _from_queue(queue: list[bytes]) -> Callable[[_Conn], bytes]:
    """The queue's requests one by one, then ``b""``: nothing more to send."""
    return lambda c: queue.pop() if queue else b""


def _send(c: _Conn, data: bytes) -> None:
    c.sent_at = time.perf_counter()
    try:
        sent = c.sock.send(data)
    except (ssl.SSLWantWriteError, BlockingIOError):
        sent = 0
    if sent < len(data):  # rare for a request of a few hundred bytes: finish it blocking
        c.sock.setblocking(True)
        c.sock.sendall(data[sent:])
        c.sock.setblocking(False)


def _drive(
    sel: selectors.BaseSelector,
    conns: list[_Conn],
    reply_end: Callable[[bytearray], int],
    seconds: float,
    record: Callable[[int], None],
) -> int:
    """Each connection sends a request, and on its reply the next, until ``seconds`` have
    passed; returns once every request sent has its reply, with how many connections ran out
    of requests before the end. ``record`` gets each round trip's latency (µs)."""
    deadline = time.perf_counter() + seconds
    active = ran_out = 0
    for c in conns:
        if data := c.make(c):
            sel.register(c.sock, selectors.EVENT_READ, c)
            _send(c, data)
            active += 1
        else:
            ran_out += 1
    while active:
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            sock = c.sock
            try:
                while True:
                    data = sock.recv(262144)
                    if not data:
                        raise ConnectionError("server closed the connection")
                    c.buf += data
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            while (end := reply_end(c.buf)) > 0:
                del c.buf[:end]
                now = time.perf_counter()
                record(int(1e6 * (now - c.sent_at)))
                data = c.make(c) if now < deadline else b""
                if data:
                    _send(c, data)
                else:
                    ran_out += now < deadline
                    sel.unregister(sock)
                    active -= 1
                    break
        if time.perf_counter() > deadline + 30:
            raise TimeoutError(f"{active} replies still missing 30 s after the end")
    return ran_out


def run(spec: dict[str, Any], go: Callable[[], None]) -> dict[str, Any]:
    """Set up, call ``go`` (which returns when the load may start), run, report. With
    ``spec["warmup"]``, ``go`` is called again between the warm-up and the counted run."""
    conns, reply_end = _set_up(spec)
    go()
    sel = selectors.DefaultSelector()
    for c in conns:
        c.sock.setblocking(False)
    if warmup := spec.get("warmup", 0):
        _drive(sel, conns, reply_end, warmup, lambda us: None)
        go()
    latencies: list[int] = []
    cpu0, t0 = _cpu(), time.perf_counter()
    ran_out = _drive(sel, conns, reply_end, spec["seconds"], latencies.append)
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    for c in conns:
        c.sock.close()
    return {
        "ops": len(latencies),
        "latencies_us": latencies,
        "cpu": cpu,
        "wall": wall,
        "ran_out": ran_out,
    }


def ready_then_go() -> None:
    """Tell the benchmark this process is set up; return when it says ``go``."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(1)


def main(runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
    """``python -m benchmarks.bench --loadgen-worker``: the stdin/stdout conversation above.
    ``runner`` runs a phase this module does not know (the benchmark's Trio-driven ones)."""
    spec = json.loads(sys.stdin.readline())
    mine = spec["phase"] in PHASES or runner is None
    result = run(spec, ready_then_go) if mine or runner is None else runner(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0
