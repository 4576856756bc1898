"""What the server is told: every limit it enforces, and how to run it as a process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.passwords import ScryptParams
from p2ppay.server.throttle import RegistrationConfig, RequestLimitConfig, ThrottleConfig
from p2ppay.settings import count, seconds, seconds_or_off, seconds_or_zero, setting, whole
from p2ppay.settings import port as flag_port
from p2ppay.wire.course import DIALECTS, REFERENCE, Dialect

DEFAULT_PORT: Final = 8700
#: The most --workers. A fixed number, not one worked out from the cores: the same command
#: line (a systemd unit) must start on every machine, and os.cpu_count() counts the host's
#: cores, not a container's share. Useful counts are about one per core; each worker is a
#: whole Python process (tens of MB) with its own few PostgreSQL connections, so 256 is far
#: beyond any of them, and only stops a typo (--workers 100000) from spawning processes until
#: the machine gives out.
MAX_WORKERS: Final = 256

#: who may bring money in: every user (``deposit``), or only the operator (``admin credit``)
DepositPolicy = Literal["open", "operator"]
LEDGER_FILE: Final = "ledger.sqlite3"  # in the state directory, unless --ledger says else


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every limit the server enforces; each field is also its command-line flag."""

    max_line: int = setting(
        p.DEFAULT_MAX_LINE, "--max-line", "longest request line in bytes", count
    )
    max_depth: int = setting(
        p.DEFAULT_MAX_DEPTH,
        "--max-depth",
        f"deepest nesting of JSON arrays and objects in a request (at most {p.MAX_DEPTH_CAP})",
        count,
    )
    receive_size: int = setting(
        16 * 1024, "--receive-size", "most bytes read from a connection at a time", count
    )
    handshake_timeout: float = setting(
        10.0, "--handshake-timeout", "seconds a TLS handshake may take", seconds
    )
    #: a total, however the bytes trickle in
    anonymous_idle_timeout: float = setting(
        60.0,
        "--idle-timeout",
        "seconds after connecting (or logging out) within which a connection must log in",
        seconds,
    )
    line_timeout: float = setting(
        30.0,
        "--line-timeout",
        "seconds within which a request line, once begun, must arrive whole",
        seconds,
    )
    write_timeout: float = setting(
        10.0,
        "--write-timeout",
        "seconds a peer that does not read what the server sends is given",
        seconds,
    )
    shutdown_grace: float = setting(
        10.0, "--shutdown-grace", "seconds in-flight requests may run after SIGTERM", seconds
    )
    max_list: int = setting(1000, "--max-list", "most online users one list reply names", count)
    #: all cores but one, which stays the event loop's
    hash_threads: int = setting(
        flag="--hash-threads",
        help="threads for password hashing",
        parse=count,
        default_factory=lambda: max(1, (os.cpu_count() or 2) - 1),
        default_text="cores - 1, at least 1",
    )
    #: Addresses take turns, so a long queue delays only its own address: the bound caps that
    #: delay, and leaves room for many people behind one NAT (a classroom logging in at once).
    hash_queue_per_address: int = setting(
        32,
        "--hash-queue-per-address",
        "password checks one address may have waiting for a hashing thread (addresses take "
        "turns); more are answered rate_limited at once",
        count,
    )
    peer_cert_lifetime: float = setting(
        24 * 3600.0,
        "--peer-cert-hours",
        "hours the peer certificate a login gets stays valid",
        seconds,
        convert=lambda hours: hours * 3600,
        shown_default=24.0,
    )
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    registrations: RegistrationConfig = field(default_factory=RegistrationConfig)
    #: those in the TLS handshake count
    max_connections: int = setting(
        20_000, "--max-connections", "connections at once, in all", count
    )
    max_connections_per_ip: int = setting(
        256, "--max-connections-per-ip", "connections at once from one address", count
    )
    #: recorded as a deposit
    course_initial_balance: int = setting(
        10_000,
        "--course-initial-balance",
        "what a new course account starts with (REGISTER#name; reference flavour)",
        whole,
    )
    course_max_message: int = setting(
        1024,
        "--course-max-message",
        "longest course-dialect message in bytes (longer: 230 and the connection is closed)",
        count,
    )
    #: Not anonymous_idle_timeout: course clients connect at start-up and then wait for their
    #: person.
    course_idle_timeout: float = setting(
        4 * 3600.0,
        "--course-idle-timeout",
        "seconds a course connection that has not logged in may stay silent (0: forever)",
        seconds_or_off,
    )
    #: For the clients (of the 2020-2021 editions) that wait for their server to speak
    #: first, before they show a menu. One line: a client reads one line for it.
    course_greeting: str | None = setting(
        None,
        "--course-greeting",
        "one line sent to each new course connection as it opens (after the TLS handshake "
        "with --course-tls), for clients that wait for a greeting; off unless given",
        metavar="TEXT",
    )
    scrypt: ScryptParams = field(default_factory=ScryptParams)
    request_expiry: float = setting(
        24 * 3600.0,
        "--request-expiry",
        "seconds a payment request stays open when its requester gives no --expires",
        seconds,
    )
    max_request_expiry: float = setting(
        30 * 24 * 3600.0,
        "--max-request-expiry",
        "the longest a payment request may stay open, in seconds",
        seconds,
    )
    #: so that nobody can flood someone with requests (nor keep unbounded state here)
    max_open_requests: int = setting(
        100,
        "--max-open-requests",
        "open payment requests one account may have made",
        count,
    )
    #: counted per requester, so that nobody can fill a payer's room for everyone else's
    max_requests_per_payer: int = setting(
        10,
        "--max-requests-per-payer",
        "open payment requests one account may have made to any one payer",
        count,
    )
    #: how fast requests may be made (token buckets per requester and per requester-payer)
    request_limits: RequestLimitConfig = field(default_factory=RequestLimitConfig)
    #: closed requests (paid, declined, cancelled, expired) are kept this long, then purged:
    #: without it every request ever made stays on disk
    request_retention: float = setting(
        30 * 86400.0,
        "--request-retention-days",
        "days a closed (paid, declined, cancelled or expired) payment request is kept before "
        "it is purged",
        seconds,
        convert=lambda days: days * 86400,
        shown_default=30.0,
    )
    request_purge_interval: float = setting(
        3600.0,
        "--request-purge-interval",
        "seconds between purges of closed payment requests older than --request-retention-days",
        seconds,
    )
    request_purge_chunk: int = setting(
        1000,
        "--request-purge-chunk",
        "closed payment requests deleted per ledger transaction when purging (small chunks "
        "keep the writer's other work waiting only briefly)",
        count,
    )
    #: "operator": users' deposits are refused (and course accounts start empty)
    deposits: DepositPolicy = setting(
        "open",
        "--deposits",
        "who brings money in: every user (deposit), or only the operator (admin credit)",
        choices=["open", "operator"],
    )

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= p.MAX_DEPTH_CAP:
            raise ValueError(f"--max-depth must be within 1..{p.MAX_DEPTH_CAP}")
        if not 1 <= self.request_expiry <= self.max_request_expiry:
            raise ValueError("--request-expiry must be within 1 s..--max-request-expiry")
        # (Every line break str.splitlines knows, not only "\n": a client may split at any.)
        greeting = self.course_greeting
        if greeting is not None and greeting.splitlines() != [greeting]:
            raise ValueError(
                "--course-greeting must be one line of text, not empty and without a line "
                "break (leave the flag out for no greeting)"
            )


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How to run a server process: where, with which files, and its :class:`ServerConfig`."""

    host: str | None = setting(
        None, "--host", "address to listen on", default_text="every interface"
    )
    port: int = setting(DEFAULT_PORT, "--port", "TLS port (0: any free one)", flag_port)
    state_dir: Path = setting(
        Path("."),
        "--state-dir",
        "ledger and certificates",
        Path,
        optional=True,
        default_text="$P2PPAY_STATE_DIR or the user data dir",
    )
    cert: Path | None = setting(None, "--cert", "your own server certificate chain (PEM)", Path)
    key: Path | None = setting(None, "--key", "the private key for --cert (PEM)", Path)
    sans: tuple[str, ...] = setting(
        (),
        "--san",
        "extra host name or IP for the generated certificate (repeatable)",
        action="append",
        metavar="NAME",
        convert=tuple,
    )
    #: a str, not a Path: a URL must keep its "//"
    ledger: str | None = setting(
        None,
        "--ledger",
        "where the ledger is: an SQLite file, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB "
        "(several nodes may share one PostgreSQL database; see docs/scaling.md)",
        metavar="PATH_OR_URL",
        default_text=f"{LEDGER_FILE} in the state directory",
    )
    new_ledger: bool = setting(
        False,
        "--new-ledger",
        "with an SQLite ledger: make a new, empty ledger even though the state directory "
        "holds a CA (without it the server refuses: the ledger it kept there is missing)",
        action="store_true",
    )
    ledger_check_interval: float = setting(
        1.0,
        "--ledger-check-interval",
        "with an SQLite ledger: seconds between checks that the ledger file is still the one "
        "opened (not deleted, replaced or truncated); every commit is checked too",
        seconds,
    )
    #: only with a PostgreSQL ledger (presence is shared then)
    node_heartbeat: float = setting(
        5.0,
        "--node-heartbeat",
        "seconds between this node's heartbeats in PostgreSQL (with a postgresql:// ledger)",
        seconds,
    )
    node_expiry: float = setting(
        15.0,
        "--node-expiry",
        "seconds without a heartbeat after which a node counts as dead and its users as gone "
        "(with a postgresql:// ledger)",
        seconds,
    )
    #: keepalives on every connection to PostgreSQL, timeouts on the ledger's sessions
    pg_timeouts: lg.PgTimeouts = field(default_factory=lg.PgTimeouts)
    node_listen_timeout: float = setting(
        2.0,
        "--node-listen-timeout",
        "seconds within which this node's LISTEN connection must hear the probe each heartbeat "
        "sends; if it does not, it is connected again (with a postgresql:// ledger)",
        seconds,
    )
    limits: lg.Limits = field(default_factory=lg.Limits)
    config: ServerConfig = field(default_factory=ServerConfig)
    max_batch: int = setting(512, "--max-batch", "most operations in one ledger commit", count)
    balance_cache_ttl: float = setting(
        0.5,
        "--balance-cache-ttl",
        "with an SQLite ledger: seconds within which a change made beside the server "
        "(p2ppay admin credit/debit) shows in list and balance (0: no cache, read every time)",
        seconds_or_zero,
    )
    course_port: int | None = setting(
        None,
        "--course-port",
        "also serve the course dialect (REGISTER#name, name#port, List, Exit, "
        "payer#amount#payee) on this port; off unless given",
        flag_port,
    )
    course_tls: bool = setting(
        False,
        "--course-tls",
        "serve the course dialect over TLS, not plain TCP",
        action="store_true",
    )
    metrics_port: int | None = setting(
        None,
        "--metrics-port",
        "serve Prometheus metrics at http://HOST:PORT/metrics; off unless given",
        flag_port,
    )
    metrics_host: str = setting(
        "127.0.0.1",
        "--metrics-host",
        "address for --metrics-port (the metrics are not secret, but not for everyone)",
    )
    course_dialect: Dialect = setting(
        REFERENCE,
        "--course-dialect",
        "flavour of the course dialect: the course's reference one, or the one the seed "
        "program speaks (REGISTER#name#port, DEPOSIT#name#amount; the payer settles)",
        choices=list(DIALECTS),
        shown_default=REFERENCE.name,
        convert=DIALECTS.__getitem__,
    )

    #: Checked at start against the open-file limit (server/fdlimit.py).
    reserved_fds: int = setting(
        64,
        "--reserved-fds",
        "file descriptors kept for the server itself (listeners, ledger, PostgreSQL, log) "
        "when --max-connections is fitted into the open-file limit (ulimit -n) at start",
        count,
    )

    workers: int = setting(
        1,
        "--workers",
        f"processes serving the same port(s) on this machine (SO_REUSEPORT), at most "
        f"{MAX_WORKERS}; more than 1 needs a PostgreSQL --ledger, and gives worker i "
        "--metrics-port PORT+i",
        count,
    )

    def __post_init__(self) -> None:
        self._check_workers()
        # (With --deposits operator course accounts start empty: the check does not apply.)
        if self.config.deposits == "open" and not (
            0 <= self.config.course_initial_balance <= self.limits.max_deposit
        ):
            raise ValueError("--course-initial-balance must be within 0..--max-deposit")
        if self.node_heartbeat >= self.node_expiry:
            raise ValueError("--node-heartbeat must be shorter than --node-expiry")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together")
        ports = [("--port", self.port), ("--course-port", self.course_port)]
        ports.append(("--metrics-port", self.metrics_port))
        given = [(flag, port) for flag, port in ports if port]  # None and 0 (any) never clash
        for i, (flag, port) in enumerate(given):
            for other, same in given[i + 1 :]:
                if port == same:
                    raise ValueError(f"{flag} and {other} are both {port}: give each its own")

    def _check_workers(self) -> None:
        if self.workers > MAX_WORKERS:
            raise ValueError(
                f"--workers {self.workers} is more than {MAX_WORKERS}, the most there may be "
                "(about one per core is what helps)"
            )
        if self.workers == 1:
            return
        if self.ledger is None or not lg.is_postgres_url(self.ledger):
            raise ValueError(
                f"--workers {self.workers} needs a PostgreSQL ledger (--ledger postgresql://...): "
                "the SQLite ledger file takes one process"
            )
        if self.metrics_port:  # worker i serves its own metrics on --metrics-port + i
            last = self.metrics_port + self.workers - 1
            if last > 65535:
                raise ValueError(
                    f"--metrics-port {self.metrics_port} with --workers {self.workers} needs "
                    f"ports up to {last}: give a lower one"
                )
            for flag, port in (("--port", self.port), ("--course-port", self.course_port)):
                if port and self.metrics_port <= port <= last:
                    raise ValueError(
                        f"{flag} {port} is among the workers' metrics ports "
                        f"{self.metrics_port}..{last}"
                    )
