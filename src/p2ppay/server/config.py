"""What the server is told: every limit it enforces, and how to run it as a process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .. import ledger as lg
from .. import protocol as p
from ..course import REFERENCE, Dialect
from ..limits import ThrottleConfig
from ..passwords import ScryptParams

DEFAULT_PORT: Final = 8700
LEDGER_FILE: Final = "ledger.sqlite3"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every limit the server enforces. All of them are settable from the command line."""

    max_line: int = p.DEFAULT_MAX_LINE
    #: the deepest nesting of JSON arrays and objects a request line may have
    max_depth: int = p.DEFAULT_MAX_DEPTH
    receive_size: int = 16 * 1024
    handshake_timeout: float = 10.0
    #: a connection is closed if it has not logged in this long after connecting (or after
    #: logging out): a total, however the bytes trickle in
    anonymous_idle_timeout: float = 60.0
    #: once a request line has begun, all of it must arrive within this (logged in or not)
    line_timeout: float = 30.0
    #: a peer that does not take our bytes for this long is disconnected
    write_timeout: float = 10.0
    #: on SIGTERM, how long in-flight requests may take before connections are cut
    shutdown_grace: float = 10.0
    max_list: int = 1000
    #: threads for password hashing: all cores but one, which stays the event loop's
    hash_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    #: password checks one address may have waiting for a hashing thread; more are answered
    #: ``rate_limited`` at once. Addresses take turns, so a long queue delays only its own
    #: address: the bound caps that delay, and leaves room for many people behind one NAT (a
    #: classroom logging in at once).
    hash_queue_per_address: int = 32
    #: how long a session's peer certificate is valid
    peer_cert_lifetime: float = 24 * 3600.0
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    #: connections at once, in all and from one address (those in the TLS handshake count)
    max_connections: int = 20_000
    max_connections_per_ip: int = 256
    #: what a new course account starts with (recorded as a deposit)
    course_initial_balance: int = 10_000
    course_max_message: int = 1024
    #: a course connection that has not logged in is closed after this long without a message
    #: (math.inf: never). Not anonymous_idle_timeout: course clients connect at start-up and
    #: then wait for their person.
    course_idle_timeout: float = 4 * 3600.0
    scrypt: ScryptParams = field(default_factory=ScryptParams)

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= p.MAX_DEPTH_CAP:
            raise ValueError(f"max_depth must be within 1..{p.MAX_DEPTH_CAP}")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How to run a server process: where, with which files, and its :class:`ServerConfig`."""

    host: str | None = None  # None: every interface
    port: int = DEFAULT_PORT
    state_dir: Path = Path(".")
    cert: Path | None = None
    key: Path | None = None
    sans: tuple[str, ...] = ()
    limits: lg.Limits = field(default_factory=lg.Limits)
    config: ServerConfig = field(default_factory=ServerConfig)
    max_batch: int = 512
    course_port: int | None = None  # None: no course-dialect listener
    course_tls: bool = False
    course_dialect: Dialect = REFERENCE
