"""Presence shared by the server nodes of one PostgreSQL database, behind
:class:`~.presence.Presence` (see docs/scaling.md).

Per node, in process: the ``name -> session`` maps of the sessions connected here (what
:meth:`PgPresence.local`, :meth:`~PgPresence.is_current` and :meth:`~PgPresence.names` answer,
and what a take-over acts on at once). Shared, in PostgreSQL: who is online on which node at
which address (table ``presence``) and which nodes are alive (table ``nodes``, a heartbeat each).

- Writes (a login, a logout, the heartbeat) change the local maps at once and queue the row
  change for one writer task, which commits all that is waiting in one transaction on a worker
  thread with its own connection: a login never waits for PostgreSQL.
- Reads (``lookup``, ``list``, the course roster) ask PostgreSQL on worker threads (a few
  connections, one limiter) for the rows of live nodes only; this node's own sessions are
  answered from its maps, which are fresher than its queued writes.
- Every login takes a number from one sequence, and a name's row keeps the highest: the newest
  login wins wherever it was made. It announces itself (``NOTIFY p2ppay_presence``, in the
  transaction that wrote its row, so delivered only after commit) and the node holding an older
  session of that name closes it. Each heartbeat also checks this node's rows, so a lost
  notification (a listener reconnecting) is made good within one heartbeat.
- Events for a user on another node (a course transfer's outcome, a payment request's news)
  are announced the same way (``NOTIFY p2ppay_presence``); the node holding that user's
  session sends it on.
- Settled payments: the ledger sends a NOTIFY inside the settle transaction, on the channel of
  the node the payee's row names (``pgschema.node_channel``), or on ``p2ppay_settled`` for
  every node when the payee has none; that listener pushes the event to the payee if it is
  connected there, and :meth:`PgPresence.settled` does nothing, so the settling node never
  sends a second copy. A node told of a payee it does not have (who moved to another node
  before the row did) says it again on ``p2ppay_settled``, once.
- A node whose heartbeat is older than ``expiry`` is dead: readers ignore its rows and the next
  heartbeat of any node deletes them. A node that finds itself deleted (cut off from PostgreSQL
  for longer than that) puts its sessions' rows back, unless a newer login took a name meanwhile
  (then its session here is replaced).

psycopg's async mode is asyncio-only, so every call is sync psycopg on a worker thread; the
LISTEN loop is a thread of its own that hands notifications to Trio (``trio.from_thread``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Final, final

import msgspec
import psycopg
import trio

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.ledger.pgschema import PRESENCE_SCHEMA_LOCK, PRESENCE_TABLES, describe, node_channel
from p2ppay.ledger.pgtimeouts import Watchdog, Watchdogs
from p2ppay.logs import LimitLog
from p2ppay.presence.local import Member
from p2ppay.wire.names import NameMap, name_key

log = logging.getLogger("p2ppay.server")

#: a login (and a course line for a user on another node) is announced here
PRESENCE_CHANNEL: Final = "p2ppay_presence"
#: (the PostgreSQL ledger announces each new transfer inside its settle transaction, on the
#: payee's node's channel, ``pgschema.node_channel``, or on lg.SETTLED_CHANNEL for every node
#: when the payee has no row here: every node listens on both)
#: PostgreSQL's clock, not each node's: nodes on several machines judge heartbeats alike
_NOW_MS: Final = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_HEARTBEAT_SQL: Final = f"""
INSERT INTO nodes (node_id, heartbeat_ms) VALUES (%s, {_NOW_MS})
ON CONFLICT (node_id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms
RETURNING (xmax = 0)
"""
#: a new login: the row is this node's unless a newer login (a higher number) holds it
_PUBLISH_SQL: Final = f"""
INSERT INTO presence (name_key, course, name, node_id, ip, port, since_ms, login_seq)
VALUES (%s, %s, %s, %s, %s, %s, {_NOW_MS}, nextval('presence_login_seq'))
ON CONFLICT (name_key, course) DO UPDATE SET
    name = excluded.name, node_id = excluded.node_id, ip = excluded.ip, port = excluded.port,
    since_ms = excluded.since_ms, login_seq = excluded.login_seq
WHERE presence.login_seq < excluded.login_seq
RETURNING login_seq
"""
#: a row put back after this node was taken for dead: only if no other login took the name
#: (a row already put back, the same login's, counts as put back)
_RESTORE_SQL: Final = f"""
INSERT INTO presence (name_key, course, name, node_id, ip, port, since_ms, login_seq)
VALUES (%s, %s, %s, %s, %s, %s, {_NOW_MS}, %s)
ON CONFLICT (name_key, course) DO UPDATE SET login_seq = excluded.login_seq
WHERE presence.node_id = excluded.node_id AND presence.login_seq = excluded.login_seq
RETURNING login_seq
"""
_LIVE: Final = f"n.heartbeat_ms >= {_NOW_MS} - %s"
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; a line for another node longer
#: than this is not relayed (today's longest event, with a 140-character memo, is ~2.2 KB)
MAX_RELAYED: Final = 7_000
#: what may come from another node as an event for a session here (kind "event")
_RELAYED_EVENTS: Final = (p.PaymentRequested, p.RequestClosed)


def one_line(exc: BaseException) -> str:
    """A psycopg error's message in one line (they come in several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def new_node_id() -> str:
    """This process's node id: readable (host and pid) and unique (random)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


# --- what the writer task does --------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Publish:
    """Put a session's row in (a login), or back (``restore``: after being taken for dead)."""

    member: Member
    course: bool
    name: str
    ip: str
    port: int | None
    restore: int | None = None  # the login number to put back
    seq: int | None = None  # after the write: the row's number if this login holds it
    #: set once the write is done (committed, or refused): see :meth:`PgPresence.published`
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def slot(self) -> tuple[bool, str]:
        return self.course, name_key(self.name)


@dataclass(slots=True, eq=False)
class _Withdraw:
    course: bool
    name: str


@dataclass(slots=True, eq=False)
class _Line:
    """A line for a user connected to another node (``NOTIFY``; that node sends it): a course
    line, or a native event (``course`` False)."""

    name: str
    line: bytes
    course: bool = True


@dataclass(slots=True, eq=False)
class _Heartbeat:
    """Also: forget dead nodes, and read this node's rows to check them; with ``probe``, also
    NOTIFY this node's own channel, which its listener must hear (see ``_watch_listener``)."""

    probe: int | None = None


@dataclass(slots=True, eq=False)
class _Leave:
    """Shutting down: this node's rows go at once (not after the expiry)."""


@dataclass(slots=True, eq=False)
class _Rebroadcast:
    """A transfer announced on this node's channel for a payee not here (moved meanwhile)."""

    payload: str


_Write = _Publish | _Withdraw | _Line | _Heartbeat | _Leave | _Rebroadcast


@dataclass(slots=True)
class _Written:
    #: this node's rows as PostgreSQL has them, (course, name key) -> login number; None when
    #: the batch did not read them
    own_rows: dict[tuple[bool, str], int] | None = None
    left: bool = False
    #: this batch deleted dead nodes (their users are gone from what this node read)
    expired: bool = False
    #: written in order; rows of this batch whose seq the thread set
    publishes: list[_Publish] = field(default_factory=list)
    #: the listener probe this batch sent (committed), if any
    probe: int | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    node_id: str
    ip: str
    port: int | None


@dataclass(frozen=True, slots=True)
class _Rows:
    read_at: float
    #: by name key, in the order of their login numbers
    by_key: dict[str, _Row]


# --- what arrives on the channels -----------------------------------------------------------
# Anyone who may connect to the database may NOTIFY anything on any channel: every payload is
# decoded into one of these shapes (types checked, no coercion) or skipped (issue 22.1).


#: a PostgreSQL bigint (what every number announced is)
_BigInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _TransferNote(msgspec.Struct, frozen=True):
    """A settled transfer, as the ledger's settle function announces it."""

    payment_id: uuid.UUID
    payer: str
    payee: str
    amount: _BigInt
    payer_balance: _BigInt
    payee_balance: _BigInt
    at_ms: _BigInt
    memo: str | None = None


class _LoginNote(msgspec.Struct, frozen=True, tag_field="kind", tag="login"):
    node: str
    name: str
    course: bool
    seq: _BigInt
    ip: str


class _LineNote(msgspec.Struct, frozen=True, tag_field="kind", tag="line"):
    """A course line for a user on the node that has it."""

    node: str
    name: str
    line: str


class _EventNote(msgspec.Struct, frozen=True, tag_field="kind", tag="event"):
    """A native event (encoded) for a user on the node that has it."""

    node: str
    name: str
    line: str


class _LogoutNote(msgspec.Struct, frozen=True, tag_field="kind", tag="logout"):
    node: str


class _LeftNote(msgspec.Struct, frozen=True, tag_field="kind", tag="left"):
    node: str


class _ExpiredNote(msgspec.Struct, frozen=True, tag_field="kind", tag="expired"):
    node: str


class _RestoredNote(msgspec.Struct, frozen=True, tag_field="kind", tag="restored"):
    node: str


_PresenceNote = (
    _LoginNote | _LineNote | _EventNote | _LogoutNote | _LeftNote | _ExpiredNote | _RestoredNote
)
_TRANSFER_NOTE: Final = msgspec.json.Decoder(_TransferNote)
_PRESENCE_NOTE: Final = msgspec.json.Decoder(_PresenceNote)
#: how much of a skipped payload its log line shows
_SHOWN: Final = 80


@final
class PgPresence:
    """Presence in PostgreSQL, for the nodes that share its ledger. Open with
    :func:`open_pg_presence`, which owns its tasks and threads."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat: float = 5.0,
        expiry: float = 15.0,
        readers: int = 2,
        node_id: str | None = None,
        listen_timeout: float = 2.0,
        timeouts: lg.PgTimeouts | None = None,
    ) -> None:
        if not 0 < heartbeat < expiry:
            raise ValueError("the heartbeat must be shorter than the expiry")
        if not listen_timeout > 0:
            raise ValueError("the listen timeout must be more than 0 seconds")
        self.url = url
        self.node_id = node_id or new_node_id()
        self.heartbeat = heartbeat
        self.expiry = expiry
        self.listen_timeout = listen_timeout
        #: TCP keepalives and tcp_user_timeout on each connection; the statement and lock
        #: timeouts on the writer's and the readers' (the listener waits by design)
        self.timeouts = timeouts or lg.PgTimeouts()
        #: cut a write or read whose backend does not answer at all (frozen) at the statement
        #: timeout, as the ledger does: the writer then retries on a new connection, a read is
        #: answered "cannot be read just now"
        self._watchdogs = Watchdogs(self.timeouts.watchdog)
        #: a login answered before its row was written (PostgreSQL too slow), once a minute
        self._slow_log = LimitLog(log, label="presence:")
        self._native: NameMap[Member] = NameMap()
        self._course: NameMap[Member] = NameMap()
        #: the login number of each local session whose row is written
        self._seqs: dict[tuple[bool, str], int] = {}
        #: the newest login made elsewhere while ours was not yet written: (number, ip)
        self._newer: dict[tuple[bool, str], tuple[int, str]] = {}
        #: each local login whose row is not written yet
        self._unwritten: dict[tuple[bool, str], _Publish] = {}
        self._writes_in, self._writes = trio.open_memory_channel[_Write](math.inf)
        self._write_conn: psycopg.Connection[Any] | None = None
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(readers)
        self._idle_readers: list[psycopg.Connection[Any]] = []
        self._stop = threading.Event()  # the listener's thread stops
        self._left = trio.Event()  # this node's rows are deleted (shutting down)
        #: told the name of each native login made on another node (a peer-key cache drops it)
        self.logged_in_elsewhere: Callable[[str], None] | None = None
        #: called with (name, event) when an event from another node was pushed to a session
        #: here (the server marks a requester's closed request as told)
        self.delivered: Callable[[str, p.Event], None] | None = None
        #: notifications handled (tests and metrics)
        self.notifications = 0
        #: notifications skipped: not of a shape this node reads, or not to be acted on
        self.skipped = 0
        #: a skipped notification is logged once a minute per channel, then with a count
        self._skip_log = LimitLog(log, label="presence: skipped a notification on")
        # The listener's liveness: each heartbeat sends a probe (a number, after a prefix no
        # other node knows) on this node's channel; the listener must hear it in time.
        self._probe_prefix = f"probe {secrets.token_hex(8)} "
        self._probes_issued = 0
        #: probes up to this number do not count (sent before the listener was listening)
        self._probe_floor = 0
        self._probe_heard = 0
        self._heard = trio.Event()  # set (and replaced) whenever a probe is heard
        self._probes_in, self._probes = trio.open_memory_channel[tuple[int, float]](math.inf)
        self._reconnect = threading.Event()  # the listener's thread connects anew
        #: times the listener was found deaf and connected anew (tests and metrics)
        self.deaf = 0
        #: transfers' notifications handled (those for this node and those for every node)
        self.transfers_heard = 0
        #: where the ledger announces transfers to users connected here
        self.channel = node_channel(self.node_id)
        #: bumped at every change of presence seen here (a login, a logout, anywhere)
        self.generation = 0
        self._live_rows: dict[bool, _Rows] = {}
        self._listings: dict[int, tuple[float, list[p.Presence]]] = {}

    # -- the local maps (what a session asks of its own node) --

    def _map(self, course: bool) -> NameMap[Member]:
        return self._course if course else self._native

    def take_over(self, member: Member, *, course: bool = False) -> None:
        assert member.user is not None
        online = self._map(course)
        old = online.pop(member.user, None)
        online[member.user] = member
        self._seqs.pop((course, name_key(member.user)), None)  # this login's row is not written
        if old is not None and old is not member:
            old.replaced(member.ip)
        self._changed()
        publish = _Publish(member, course, member.user, member.ip, member.listed_port)
        self._unwritten[publish.slot] = publish
        self._writes_in.send_nowait(publish)

    async def published(self, member: Member, *, course: bool = False) -> None:
        """Return once ``member``'s login is written (or refused, or lost to a newer login):
        from then on every node's :meth:`lookup` finds it, whether or not that node has heard
        the login's notification yet (read-your-writes across nodes)."""
        if member.user is None:
            return
        publish = self._unwritten.get((course, name_key(member.user)))
        if publish is not None and publish.member is member:
            # Bounded: PostgreSQL not answering must not hold logins for as long as it lasts
            # (the writer keeps retrying; other nodes find the login once its row is written).
            with trio.move_on_after(self.timeouts.watchdog) as waited:
                await publish.done.wait()
            if waited.cancelled_caught:
                self._slow_log.hit(
                    "slow-login-row",
                    "a login was answered before its row was written (PostgreSQL did not "
                    f"answer within {self.timeouts.watchdog:g} s)",
                )

    def forget(self, member: Member, *, course: bool = False) -> None:
        online = self._map(course)
        if member.user is not None and online.get(member.user) is member:
            del online[member.user]
            self._seqs.pop((course, name_key(member.user)), None)
            self._changed()
            self._writes_in.send_nowait(_Withdraw(course, member.user))

    def is_current(self, member: Member, *, course: bool = False) -> bool:
        return member.user is not None and self._map(course).get(member.user) is member

    def local(self, name: str, *, course: bool = False) -> Member | None:
        return self._map(course).get(name)

    def names(self, *, course: bool = False) -> list[str]:
        return list(self._map(course))

    def __len__(self) -> int:
        return len(self._native) + len(self._course)

    def _replace_local(self, course: bool, name: str, by_ip: str) -> None:
        """A newer login on another node holds ``name``: the session here is replaced."""
        member = self._map(course).pop(name, None)
        self._seqs.pop((course, name_key(name)), None)
        self._changed()
        if member is not None:
            member.replaced(by_ip)

    # -- events across nodes --

    def settled(self, transfer: lg.Transfer) -> None:
        """Nothing: the ledger's ``p2ppay_settled`` notification reaches every node, and the
        payee's node tells the payee (this one too, if the payee is here)."""

    def tell_course(self, name: str, line: bytes) -> None:
        member = self._course.get(name)
        if member is not None:
            member.told(line)
        else:
            self._relay(_Line(name, line))

    def tell(self, name: str, event: p.Event) -> bool:
        member = self._native.get(name)
        if member is not None:
            member.push(event)
            return True
        # (to every node: the one where ``name`` is online sends it)
        self._relay(_Line(name, p.encode_event(event), course=False))
        return False

    def _relay(self, line: _Line) -> None:
        if len(line.line) > MAX_RELAYED:  # (escaped in the payload's JSON, it grows)
            log.warning(
                "presence: a %d-byte line for %s is too long to relay", len(line.line), line.name
            )
            return
        self._writes_in.send_nowait(line)

    # -- reads: every live node's rows --

    def _changed(self) -> None:
        """Presence changed here or on another node: what was read is stale."""
        self.generation += 1
        self._live_rows.clear()
        self._listings.clear()

    async def _live(self, course: bool) -> _Rows:
        """Every live node's rows of one dialect: read again after any change anywhere (every
        change is announced), and at least every heartbeat."""
        now = trio.current_time()
        cached = self._live_rows.get(course)
        if cached is not None and now - cached.read_at < self.heartbeat:
            return cached
        generation = self.generation
        found = await self._read(
            "SELECT r.name_key, r.name, r.node_id, r.ip, r.port FROM presence r "
            f"JOIN nodes n USING (node_id) WHERE r.course = %s AND {_LIVE} ORDER BY r.login_seq",
            (course, self._expiry_ms),
        )
        rows = _Rows(now, {key: _Row(*row) for key, *row in found})
        if self.generation == generation:  # (else a change came meanwhile: not kept)
            self._live_rows[course] = rows
        return rows

    async def lookup(self, name: str, *, course: bool = False) -> p.Presence | None:
        member = self._map(course).get(name)
        if member is not None and member.user is not None:
            return p.Presence(member.user, member.ip, member.listed_port)
        key = name_key(name)
        cached = self._live_rows.get(course)
        live = await self._live(course)
        row = live.by_key.get(key)
        if row is None and live is cached:
            # What was read may predate a login another node has already answered (its
            # notification is not here yet): a miss is asked of PostgreSQL before it is told.
            found = await self._read(
                "SELECT r.name, r.node_id, r.ip, r.port FROM presence r "
                f"JOIN nodes n USING (node_id) WHERE r.name_key = %s AND r.course = %s "
                f"AND {_LIVE}",
                (key, course, self._expiry_ms),
            )
            if found:
                row = _Row(*found[0])
                self._changed()  # (what was read is stale: read again next time)
        if row is None or row.node_id == self.node_id:  # (not here any more)
            return None
        return p.Presence(row.name, row.ip, row.port)

    async def listing(self, limit: int) -> list[p.Presence]:
        cached = self._listings.get(limit)
        if cached is not None and trio.current_time() - cached[0] < self.heartbeat:
            return cached[1]
        generation = self.generation
        live = await self._live(False)
        found = {
            key: p.Presence(row.name, row.ip, row.port)
            for key, row in live.by_key.items()
            if row.node_id != self.node_id
        }
        for name, member in self._native.items():  # this node's own: fresher than its rows
            found[name_key(name)] = p.Presence(name, member.ip, member.listed_port)
        # by code point of the name key, as LocalPresence sorts
        listing = [found[key] for key in sorted(found)[:limit]]
        if self.generation == generation:
            self._listings[limit] = (live.read_at, listing)
        return listing

    async def course_roster(self) -> list[tuple[str, str, int]]:
        live = await self._live(True)
        # In the order they came online: rows by login number; this node's own sessions as
        # it knows them (fresher than its rows), those not written yet last.
        order = {key: i for i, key in enumerate(live.by_key)}
        roster = [
            (order[key], (row.name, row.ip, row.port or 0))
            for key, row in live.by_key.items()
            if row.node_id != self.node_id and key not in self._course
        ]
        tail = len(order)
        for name, member in self._course.items():
            key = name_key(name)
            row = live.by_key.get(key)
            if (True, key) in self._seqs and row is not None and row.node_id == self.node_id:
                place = order[key]
            else:
                tail += 1
                place = tail
            roster.append((place, (name, member.ip, member.listed_port or 0)))
        return [entry for _, entry in sorted(roster, key=lambda e: e[0])]

    @property
    def _expiry_ms(self) -> int:
        return int(self.expiry * 1000)

    async def _read(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        async with self._read_limiter:
            idle = self._idle_readers.pop() if self._idle_readers else None
            try:
                conn, rows = await trio.to_thread.run_sync(
                    self._query, idle, sql, params, self._watchdogs.call()
                )
            except psycopg.OperationalError as exc:
                log.warning("presence: PostgreSQL cannot be read: %s", one_line(exc))
                raise lg.LedgerUnavailable("who is online cannot be read just now") from None
            self._idle_readers.append(conn)
            return rows

    def _query(
        self,
        conn: psycopg.Connection[Any] | None,
        sql: str,
        params: Sequence[object],
        watchdog: Watchdog,
    ) -> tuple[psycopg.Connection[Any], list[tuple[Any, ...]]]:
        try:
            if conn is not None:
                try:
                    watchdog.watch(conn)
                    return conn, conn.execute(sql, params).fetchall()
                except psycopg.OperationalError:
                    conn.close()  # cut while idle (a restart, a blip): once more, connected anew
                    if watchdog.fired:
                        raise  # (cut by the watchdog: that one had its time)
            conn = self._connect(sessions=True)
            try:
                watchdog.watch(conn)
                return conn, conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                conn.close()
                raise
        finally:
            watchdog.release()

    def _connect(self, *, sessions: bool = False) -> psycopg.Connection[Any]:
        # Named, so that pg_stat_activity shows which node each connection is. With keepalives:
        # a connection whose PostgreSQL went away silently is found dead, not waited on for ever.
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=10,
            application_name=f"p2ppay presence {self.node_id}"[:63],
            **self.timeouts.connect_params(given, sessions=sessions),
        )

    # -- the writer --

    async def start(self) -> None:
        """Create the tables if missing and heartbeat once (this node's rows refer to it);
        psycopg's error, as it is, if PostgreSQL refuses."""
        await trio.to_thread.run_sync(self._start_blocking, limiter=self._write_limiter)

    async def _writer(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit what is queued, a batch per transaction, until :class:`_Leave`."""
        task_status.started()
        while True:
            batch = [await self._writes.receive()]
            while True:
                try:
                    batch.append(self._writes.receive_nowait())
                except trio.WouldBlock:
                    break
            written = await self._commit(batch)
            if written is not None:
                self._written(written)
            for w in batch:  # (written or refused: a login waiting on it is answered)
                if isinstance(w, _Publish):
                    if self._unwritten.get(w.slot) is w:
                        del self._unwritten[w.slot]
                    w.done.set()
            if written is not None and written.left:
                self._left.set()
                return

    def _start_blocking(self) -> None:
        # Without the statement and lock timeouts (nodes starting together wait their turn for
        # the schema lock); the writer connects with them at its first batch.
        with self._connect() as conn, conn.transaction():
            # (nodes starting together create the tables once; so does the ledger's migration)
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRESENCE_SCHEMA_LOCK,))
            conn.execute(PRESENCE_TABLES)
            conn.execute(_HEARTBEAT_SQL, (self.node_id,))
        log.info("presence: node %s on PostgreSQL at %s", self.node_id, describe(self.url))

    async def _commit(self, batch: list[_Write]) -> _Written | None:
        """Commit ``batch``, retrying while PostgreSQL is unreachable (every write is safe to
        repeat); None if PostgreSQL refused it (a bug: logged, and the batch dropped)."""
        delay = 0.1
        while True:
            try:
                return await trio.to_thread.run_sync(
                    self._commit_blocking,
                    batch,
                    self._watchdogs.call(),
                    limiter=self._write_limiter,
                )
            except psycopg.OperationalError as exc:
                log.warning(
                    "presence: PostgreSQL unreachable (%s); retrying in %.1f s",
                    one_line(exc),
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, self.heartbeat)
            except psycopg.Error as exc:
                log.error("presence: a write was refused: %s", one_line(exc))
                return None

    def _commit_blocking(self, batch: list[_Write], watchdog: Watchdog) -> _Written:
        conn = self._write_conn
        if conn is None or conn.closed:
            conn = self._write_conn = self._connect(sessions=True)
        written = _Written()
        check = False
        watchdog.watch(conn)
        try:
            with conn.transaction():
                (fresh,) = conn.execute(_HEARTBEAT_SQL, (self.node_id,)).fetchone() or (False,)
                check = bool(fresh)  # taken for dead and deleted: check (restore) every row
                for w in batch:
                    if isinstance(w, _Publish):
                        self._publish_blocking(conn, w)
                        written.publishes.append(w)
                    elif isinstance(w, _Withdraw):
                        gone = conn.execute(
                            "DELETE FROM presence WHERE name_key = %s AND course = %s "
                            "AND node_id = %s RETURNING 1",
                            (name_key(w.name), w.course, self.node_id),
                        ).fetchone()
                        if gone:
                            self._notify(conn, {"kind": "logout"})
                    elif isinstance(w, _Line):
                        self._relay_blocking(conn, w)
                    elif isinstance(w, _Heartbeat):
                        check = True
                        if w.probe is not None:
                            conn.execute(
                                "SELECT pg_notify(%s, %s)",
                                (self.channel, f"{self._probe_prefix}{w.probe}"),
                            )
                            written.probe = w.probe
                    elif isinstance(w, _Rebroadcast):
                        conn.execute("SELECT pg_notify(%s, %s)", (lg.SETTLED_CHANNEL, w.payload))
                    else:
                        conn.execute("DELETE FROM nodes WHERE node_id = %s", (self.node_id,))
                        self._notify(conn, {"kind": "left"})
                        written.left = True
                if check and not written.left:
                    dead = conn.execute(
                        f"DELETE FROM nodes WHERE heartbeat_ms < {_NOW_MS} - %s RETURNING 1",
                        (self._expiry_ms,),
                    ).fetchall()
                    if dead:
                        self._notify(conn, {"kind": "expired"})
                        written.expired = True
                    rows = conn.execute(
                        "SELECT course, name_key, login_seq FROM presence WHERE node_id = %s",
                        (self.node_id,),
                    ).fetchall()
                    written.own_rows = {(c, k): s for c, k, s in rows}
        except psycopg.OperationalError:
            conn.close()
            raise
        finally:
            watchdog.release()
        return written

    def _publish_blocking(self, conn: psycopg.Connection[Any], w: _Publish) -> None:
        key = name_key(w.name)
        if w.restore is None:
            row = conn.execute(
                _PUBLISH_SQL, (key, w.course, w.name, self.node_id, w.ip, w.port)
            ).fetchone()
        else:
            row = conn.execute(
                _RESTORE_SQL, (key, w.course, w.name, self.node_id, w.ip, w.port, w.restore)
            ).fetchone()
        w.seq = None if row is None else int(row[0])
        if w.seq is None:
            return
        if w.restore is None:
            self._notify(
                conn,
                {"kind": "login", "name": w.name, "course": w.course, "seq": w.seq, "ip": w.ip},
            )
        else:
            self._notify(conn, {"kind": "restored"})

    def _relay_blocking(self, conn: psycopg.Connection[Any], w: _Line) -> None:
        """Announce one line for another node, in a savepoint of its own: if PostgreSQL
        refuses it, it alone is dropped (logged), not the logins and heartbeat beside it."""
        kind = "line" if w.course else "event"
        try:
            with conn.transaction():
                self._notify(conn, {"kind": kind, "name": w.name, "line": w.line.decode()})
        except psycopg.OperationalError:
            raise  # the connection, not this line: the batch is retried
        except psycopg.Error as exc:
            log.error("presence: a line for %s was not relayed: %s", w.name, one_line(exc))

    def _notify(self, conn: psycopg.Connection[Any], payload: dict[str, Any]) -> None:
        payload.setdefault("node", self.node_id)
        conn.execute("SELECT pg_notify(%s, %s)", (PRESENCE_CHANNEL, json.dumps(payload)))

    def _written(self, written: _Written) -> None:
        """Back in Trio after a commit: what the writes decided for the sessions here."""
        if written.probe is not None:  # (committed now: the listener's clock starts)
            self._probes_in.send_nowait((written.probe, trio.current_time()))
        if written.expired:  # (the others hear of it; this node skips its own announcements)
            self._changed()
        for w in written.publishes:
            newer = self._newer.pop(w.slot, None)
            if self._map(w.course).get(w.name) is not w.member:
                continue  # gone (or replaced here) meanwhile
            if w.seq is None:  # a newer login elsewhere holds the name
                self._replace_local(w.course, w.name, newer[1] if newer else "another node")
            elif newer is not None and newer[0] > w.seq:
                self._replace_local(w.course, w.name, newer[1])
            else:
                self._seqs[w.slot] = w.seq
        if written.own_rows is None:
            return
        # Each session here whose row is not as written lost it (another node's newer login
        # whose notification was lost), or was deleted with this node taken for dead: put it
        # back unless a newer login holds the name (the restore then replaces it).
        for course in (False, True):
            for name, member in self._map(course).items():
                slot = (course, name_key(name))
                seq = self._seqs.get(slot)
                if seq is not None and written.own_rows.get(slot) != seq:
                    self._writes_in.send_nowait(
                        _Publish(member, course, name, member.ip, member.listed_port, seq)
                    )

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            self._probes_issued += 1
            self._writes_in.send_nowait(_Heartbeat(self._probes_issued))

    async def _watch_listener(self) -> None:
        """Each committed probe must be heard within ``listen_timeout``: else the LISTEN
        connection is taken for deaf (its backend frozen, the socket silently cut: nothing
        else would tell), and the listener connects anew and resyncs.

        (A hard choice: TCP keepalives alone see a dead peer only, not a frozen backend, and
        notifications are silent by nature, so only a round trip through PostgreSQL proves
        the connection hears. The heartbeat's transaction is that round trip, for free.)"""
        while True:
            probe, committed_at = await self._probes.receive()
            with trio.move_on_at(committed_at + self.listen_timeout):
                while self._probe_heard < probe:
                    await self._heard.wait()
            if self._probe_heard >= probe or probe <= self._probe_floor:
                continue
            self.deaf += 1
            log.warning(
                "presence: the LISTEN connection did not hear this node's heartbeat within "
                "%g s; connecting it again (--node-listen-timeout)",
                self.listen_timeout,
            )
            self._probe_floor = self._probes_issued  # (those went to the deaf connection)
            self._reconnect.set()

    # -- the listener --

    async def _listener(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN on a thread of its own until :attr:`_stop` is set; started once listening."""
        listening = trio.Event()

        def connected() -> None:
            self._probe_floor = self._probes_issued  # (probes sent before may be lost)
            if listening.is_set():  # reconnected: notifications may have been lost
                self._changed()
                self._writes_in.send_nowait(_Heartbeat())  # (it checks every row)
            listening.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, self._listen_blocking, connected))
            await listening.wait()
            task_status.started()

    def _listen_blocking(self, started: Callable[[], None]) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {PRESENCE_CHANNEL}")
                    conn.execute(f"LISTEN {lg.SETTLED_CHANNEL}")
                    conn.execute(f"LISTEN {self.channel}")
                    self._reconnect.clear()
                    trio.from_thread.run_sync(started)
                    delay = 0.1
                    while not self._stop.is_set() and not self._reconnect.is_set():
                        # Up to 0.5 s per wait: how soon the loop sees it is to stop.
                        notes = self._receive(conn, 0.5, 1)
                        if notes:
                            # Then all already here, in one hop to Trio (a hop costs more
                            # than handling one).
                            notes += self._receive(conn, 0.0, None)
                            trio.from_thread.run_sync(self._on_notifies, notes)
            except psycopg.Error as exc:  # (a lost connection, mostly: connect again)
                if self._stop.is_set():
                    return
                log.warning(
                    "presence: listening to PostgreSQL failed (%s); again in %.1f s",
                    one_line(exc),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.heartbeat)

    def _receive(
        self, conn: psycopg.Connection[Any], timeout: float, stop_after: int | None
    ) -> list[tuple[str, str]]:
        """Notifications as (channel, payload). One that psycopg cannot decode (bytes that
        are not the connection's encoding: a database in SQL_ASCII) is skipped, with any
        that came in the same packet (psycopg drops those): logged, and the rest read on."""
        notes: list[tuple[str, str]] = []
        try:
            for n in conn.notifies(timeout=timeout, stop_after=stop_after):
                notes.append((n.channel, n.payload))
        except UnicodeDecodeError as exc:
            trio.from_thread.run_sync(self._undecodable, exc)
        return notes

    def _undecodable(self, exc: UnicodeDecodeError) -> None:
        self.skipped += 1
        self._skip_log.hit("a channel", f"it is not text in the connection's encoding ({exc})")
        # (what came with it is lost: as after a reconnection, read afresh and check every row)
        self._changed()
        self._writes_in.send_nowait(_Heartbeat())

    def _on_notifies(self, notes: list[tuple[str, str]]) -> None:
        for channel, payload in notes:
            self.notifications += 1
            try:
                self._on_notify(channel, payload)
            except Exception as exc:  # (nothing on a channel may end the listener)
                self.skipped += 1
                if isinstance(exc, msgspec.DecodeError):
                    why = f"it could not be read ({exc})"
                else:
                    why = f"it could not be read ({type(exc).__name__}: {exc})"
                self._skip_log.hit(channel, f"{why}: {payload[:_SHOWN]!r}")

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == self.channel and payload.startswith(self._probe_prefix):
            probe = int(payload[len(self._probe_prefix) :])
            if probe > self._probe_heard:
                self._probe_heard = probe
                self._heard.set()
                self._heard = trio.Event()
            return
        if channel == lg.SETTLED_CHANNEL or channel == self.channel:
            transfer = _TRANSFER_NOTE.decode(payload)
            if (
                not self._on_settled(transfer)
                and channel == self.channel
                and transfer.payee not in self._course  # (course: nobody reads it)
            ):
                self._writes_in.send_nowait(_Rebroadcast(payload))
            return
        if channel != PRESENCE_CHANNEL:
            raise ValueError("not a channel this node reads")
        note = _PRESENCE_NOTE.decode(payload)
        if note.node == self.node_id:
            return
        if isinstance(note, _LineNote):
            member = self._course.get(note.name)
            if member is not None:
                member.told(note.line.encode())
        elif isinstance(note, _EventNote):
            member = self._native.get(note.name)
            if member is not None:
                event = p.decode_event(note.line.encode())
                if not isinstance(event, _RELAYED_EVENTS):
                    raise ValueError(f"not an event to relay: {event!r}")
                member.push(event)
                if self.delivered is not None:
                    self.delivered(note.name, event)
        else:  # a login, logout, restore, ...: what was read is stale
            self._changed()
            if isinstance(note, _LoginNote):
                self._on_login(note.name, note.course, note.seq, note.ip)

    def _on_settled(self, note: _TransferNote) -> bool:
        self.transfers_heard += 1
        member = self._native.get(note.payee)
        if member is None:
            return False
        member.paid(
            lg.Transfer(
                note.payment_id,
                note.payer,
                note.payee,
                note.amount,
                note.payer_balance,
                note.payee_balance,
                note.at_ms,
                memo=note.memo,
            )
        )
        return True

    def _on_login(self, name: str, course: bool, seq: int, ip: str) -> None:
        if not course and self.logged_in_elsewhere is not None:
            self.logged_in_elsewhere(name)
        if self._map(course).get(name) is None:
            return
        slot = (course, name_key(name))
        ours = self._seqs.get(slot)
        if ours is None:  # our login's row is not written yet: decided when it is
            if seq > self._newer.get(slot, (0, ""))[0]:
                self._newer[slot] = (seq, ip)
        elif ours < seq:
            self._replace_local(course, name, ip)


@asynccontextmanager
async def open_pg_presence(
    url: str,
    *,
    heartbeat: float = 5.0,
    expiry: float = 15.0,
    readers: int = 2,
    listen_timeout: float = 2.0,
    timeouts: lg.PgTimeouts | None = None,
) -> AsyncIterator[PgPresence]:
    """Join the nodes of the database at ``url``: tables created if missing, this node's
    heartbeat and LISTEN running; on exit this node's rows are deleted (when PostgreSQL can be
    reached within a few seconds; otherwise they expire)."""
    presence = PgPresence(
        url,
        heartbeat=heartbeat,
        expiry=expiry,
        readers=readers,
        listen_timeout=listen_timeout,
        timeouts=timeouts,
    )
    try:
        await presence.start()  # (outside the nursery: its error is not wrapped in a group)
        async with trio.open_nursery() as watching:
            await watching.start(presence._watchdogs.run)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(presence._writer)
                    await nursery.start(presence._listener)
                    nursery.start_soon(presence._heartbeats)
                    nursery.start_soon(presence._watch_listener)
                    try:
                        yield presence
                    finally:
                        presence._writes_in.send_nowait(_Leave())
                        with trio.CancelScope(shield=True) as leaving:
                            leaving.deadline = trio.current_time() + 5
                            await presence._left.wait()
                        if leaving.cancelled_caught:
                            log.warning(
                                "presence: could not leave PostgreSQL; this node's rows expire"
                            )
                        presence._stop.set()
                        nursery.cancel_scope.cancel()
            finally:
                presence._watchdogs.stop()  # (once the writer and the readers have returned)
    finally:
        presence._stop.set()
        for conn in [*presence._idle_readers, presence._write_conn]:
            if conn is not None:
                conn.close()
