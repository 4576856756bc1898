"""How long a node waits for PostgreSQL: the timeouts of every connection the ledger opens, and
a watchdog for the calls that PostgreSQL's own timeouts cannot end.

- :class:`PgTimeouts`: TCP keepalives and ``tcp_user_timeout`` on every connection (a server
  that vanished without a word is noticed), and ``statement_timeout`` / ``lock_timeout`` on the
  writer's and the readers' sessions (a slow statement, or one waiting on a lock another
  connection holds, ends with an error instead of stalling every caller behind it).
- :class:`Watchdogs` / :class:`Watchdog`: a blocking call on a connection whose backend is alive
  but does not answer (frozen: SIGSTOP, a hung machine whose TCP stack still acknowledges) is
  never ended by the statement timeout, whose timer runs in that frozen backend. So each call
  also has a deadline here, on the client: once it passes, the connection's socket is shut
  down, the thread blocked on it returns with an error, and the connection is discarded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Final, final

import psycopg
import trio

from p2ppay.ownthread import run_in_own_thread
from p2ppay.settings import pg_count, pg_seconds, setting

#: How much sooner than the watchdog PostgreSQL's own ``statement_timeout`` ends a statement
#: (at most; a tenth of it for short ones): PostgreSQL's timeout, which leaves the connection
#: usable, gets the first chance, and the watchdog's cut, which costs a new connection, keeps
#: the bound the flag promises when PostgreSQL does not answer at all.
WATCHDOG_MARGIN: Final = 0.5
#: The longest the watchdogs' task sleeps: a call that began meanwhile is seen this late at
#: most (its own deadline is then slept to exactly).
TICK: Final = 0.1


def _ms(value: float) -> int:
    return max(1, round(value * 1000))


@final
@dataclass(frozen=True, slots=True)
class PgTimeouts:
    """The libpq parameters of the PostgreSQL ledger's connections; each field is also the
    server's command-line flag. Parameters the ``--ledger`` URL sets itself win."""

    statement_timeout: float = setting(
        10.0,
        "--pg-statement-timeout",
        "with a PostgreSQL ledger: seconds a ledger batch or read may take (then it is "
        "answered internal_error: a client retries by payment id, so nothing is lost)",
        pg_seconds,
    )
    lock_timeout: float = setting(
        5.0,
        "--pg-lock-timeout",
        "with a PostgreSQL ledger: seconds a statement may wait for a lock another "
        "connection holds",
        pg_seconds,
    )
    keepalive_idle: int = setting(
        10,
        "--pg-keepalive-idle",
        "with a PostgreSQL ledger: seconds a connection is idle before TCP keepalives start",
        pg_count,
    )
    keepalive_interval: int = setting(
        5,
        "--pg-keepalive-interval",
        "with a PostgreSQL ledger: seconds between unanswered TCP keepalives",
        pg_count,
    )
    keepalive_count: int = setting(
        3,
        "--pg-keepalive-count",
        "with a PostgreSQL ledger: unanswered TCP keepalives after which a connection is dead",
        pg_count,
    )
    tcp_user_timeout: float = setting(
        30.0,
        "--pg-tcp-user-timeout",
        "with a PostgreSQL ledger: seconds data sent to PostgreSQL may stay unacknowledged "
        "before the connection is dead",
        pg_seconds,
    )

    def __post_init__(self) -> None:
        # (The flags' parsers say it first; this is for those who build one in Python.)
        for name in ("statement_timeout", "lock_timeout", "tcp_user_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"--pg-{name.replace('_', '-')} must be more than 0 seconds")
        for name in ("keepalive_idle", "keepalive_interval", "keepalive_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"--pg-{name.replace('_', '-')} must be at least 1")

    @property
    def watchdog(self) -> float:
        """Seconds after which a call on a connection is cut (see :class:`Watchdog`): the
        flag's bound itself."""
        return self.statement_timeout

    @property
    def server_statement_timeout(self) -> float:
        """PostgreSQL's ``statement_timeout``: a little under the watchdog's."""
        return self.statement_timeout - min(WATCHDOG_MARGIN, self.statement_timeout / 10)

    def connect_params(self, given: dict[str, Any], *, sessions: bool) -> dict[str, Any]:
        """The parameters to add to a connection whose URL says ``given``; ``sessions``: with
        the statement and lock timeouts too (the writer's and the readers' connections, not
        a migration's, which may rightly take long)."""
        params: dict[str, Any] = {
            "keepalives": 1,
            "keepalives_idle": self.keepalive_idle,
            "keepalives_interval": self.keepalive_interval,
            "keepalives_count": self.keepalive_count,
            "tcp_user_timeout": _ms(self.tcp_user_timeout),
        }
        params = {key: value for key, value in params.items() if key not in given}
        if sessions:
            ours = (
                f"-c statement_timeout={_ms(self.server_statement_timeout)}"
                f" -c lock_timeout={_ms(self.lock_timeout)}"
            )
            # After the URL's own options: a later -c wins, and these are what we rely on.
            theirs = given.get("options")
            params["options"] = f"{theirs} {ours}" if theirs else ours
        return params


def _shut(db: psycopg.Connection[Any]) -> None:
    """Shut ``db``'s socket down (not close it: the thread using it still holds the fd)."""
    try:
        fd = db.pgconn.socket
    except (psycopg.Error, OSError):
        return  # no socket left: nothing is blocked on it
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already shut, or reset by the server: the call returns anyway


@final
class Watchdog:
    """The deadline of one blocking call (a writer batch, a read) in a worker thread, kept by
    its :class:`Watchdogs`.

    The thread says which connection it is using (:meth:`watch`) and when it stops using it
    (:meth:`release`); once the call has run for ``limit`` seconds (counted from its first
    :meth:`watch`: not while it waits for a thread), :attr:`fired` is set and the connection's
    socket is shut down. A connection is never cut after the thread released it (it may be
    someone else's by then): both happen under the :class:`Watchdogs`' lock."""

    __slots__ = ("_db", "_owner", "_since", "fired")

    def __init__(self, owner: Watchdogs) -> None:
        self._owner = owner
        self._db: psycopg.Connection[Any] | None = None
        self._since: float | None = None
        self.fired = False

    @property
    def limit(self) -> float:
        return self._owner.limit

    def watch(self, db: psycopg.Connection[Any]) -> None:
        """(In the thread.) ``db`` is used from now on; cut at once if the time is up."""
        with self._owner.lock:
            if self._since is None:
                self._since = time.monotonic()
            self._db = db
            self._owner.active.add(self)
            if self.fired:
                _shut(db)

    def release(self) -> None:
        """(In the thread.) No connection is in use any more."""
        with self._owner.lock:
            self._db = None
            self._owner.active.discard(self)

    def _left(self, now: float) -> float:
        assert self._since is not None  # (active ones have started)
        return self._since + self._owner.limit - now

    def _cut(self) -> None:
        self.fired = True
        if self._db is not None:
            _shut(self._db)


@final
class Watchdogs:
    """Every :class:`Watchdog` of one ledger, and the one Trio task (:meth:`run`) that cuts
    the calls that are overdue. (One task for all, woken at least every :data:`TICK`, rather
    than a timer task per call: a call then costs a set insertion, not a task.)"""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.active: set[Watchdog] = set()
        self._stopped = threading.Event()

    def call(self) -> Watchdog:
        """A deadline for one more call."""
        return Watchdog(self)

    def _cut_overdue(self) -> float:
        """Cut the calls whose time is up; the seconds until the next one's is."""
        now = time.monotonic()
        wait = TICK
        with self.lock:
            for watchdog in list(self.active):
                left = watchdog._left(now)
                if left <= 0:
                    watchdog._cut()
                    self.active.discard(watchdog)
                else:
                    wait = min(wait, left)
        return wait

    def _keep(self) -> None:
        """(In its own thread.) Cut overdue calls until :meth:`stop`."""
        while not self._stopped.wait(self._cut_overdue()):
            pass

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Cut overdue calls until :meth:`stop`, in a thread of their own that this task owns
        (:func:`~p2ppay.ownthread.run_in_own_thread`): the deadlines are the real time a
        blocked PostgreSQL call has taken. A ledger closing (which lets the calls in flight
        finish) does not take their deadlines away: only :meth:`stop` ends it."""
        task_status.started()
        await run_in_own_thread(self._keep, name="p2ppay pg watchdog")

    def stop(self) -> None:
        self._stopped.set()


__all__ = ["TICK", "WATCHDOG_MARGIN", "PgTimeouts", "Watchdog", "Watchdogs"]
