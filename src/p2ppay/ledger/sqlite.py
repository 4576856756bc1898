"""Where money moves: accounts, deposits and exactly-once transfers in a durable SQLite ledger.

Every call is an *operation* handed to one writer task. The writer takes all operations waiting
at that moment (up to ``max_batch``), runs them in one transaction on its dedicated connection in
a worker thread, commits with ``synchronous=FULL`` and only then answers each caller (group
commit). An operation refuses (insufficient funds, say) only before it writes anything, so a
refusal leaves the batch intact; any other failure, and a failed commit, roll the whole batch
back and every caller in it gets :class:`LedgerUnavailable`: nothing of it is acknowledged.

Reads (an account, a history, the audit) run on connections of their own, beside the writer
(WAL lets them), so they never wait behind a commit. The connections come from ``connect``,
:func:`~p2ppay.ledger.schema.connect_sqlite` by default: the seam where tests put a connection
that fails (or lies) on purpose.

The file is watched: at open (``PRAGMA quick_check``), after every commit before its callers
are answered, and every ``check_interval`` seconds. A file deleted, replaced or truncated behind
the ledger's back (it would go on committing into an unlinked file, or onto a stranger's) makes
it stop: nothing more is acknowledged, every call is :class:`LedgerFileUnusable`, and one line
says so. Not seen: a change in place that keeps the file's size, and anything done to the
``-wal`` file (``p2ppay admin audit`` finds the first, not the second).

The ledger knows nothing of connections or the wire protocol, and never calls back up: it is
handed what it needs (e.g. the payee's key an acceptance was checked with) and checks it against
what it stores, inside the transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import trio

from p2ppay.ledger.interface import (
    INCOMING_REQUEST_ORDER,
    REQUEST_COLUMNS,
    Account,
    AccountFrozen,
    AccountKind,
    AmountOutOfRange,
    Audit,
    BalanceLimit,
    DepositIdConflict,
    Entry,
    InsufficientFunds,
    LedgerError,
    LedgerFileUnusable,
    LedgerObserver,
    LedgerUnavailable,
    Limits,
    NameTaken,
    OpenRequests,
    PaymentIdConflict,
    PaymentRequest,
    SelfPayment,
    TooManyRequests,
    Transfer,
    Unauthorized,
    UnknownAccount,
    UnknownPayee,
    UnknownRequest,
    history_entries,
    history_params,
)
from p2ppay.ledger.schema import (
    connect_sqlite,
)
from p2ppay.ownthread import run_in_own_thread
from p2ppay.wire.names import is_valid_name, name_key

T = TypeVar("T")

log = logging.getLogger("p2ppay.ledger")

#: what SQLite says of a file that is not a database, or one whose pages do not add up
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _raise_if_damaged(path: str, exc: sqlite3.DatabaseError) -> None:
    """:class:`LedgerFileUnusable` if ``exc`` says the file is damaged (not, e.g., locked)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _DAMAGED:
        raise LedgerFileUnusable(f"{path}: {exc}; restore the ledger from a backup") from exc


def _quick_check(path: str) -> None:
    """``PRAGMA quick_check`` of the file at ``path``, if there is one (the integrity check
    without its index cross-checks: 1.5-1.9 s for a 187 MB ledger, integrity_check 10-14 s), or
    :class:`LedgerFileUnusable`. On a connection of its own, before the writer's opens and
    migrates it: a damaged file is left exactly as it was found."""
    if path == ":memory:" or not os.path.exists(path):
        return
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            found = [" ".join(str(row[0]).split()) for row in db.execute("PRAGMA quick_check(3)")]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        _raise_if_damaged(path, exc)
        raise
    if found != ["ok"]:  # (said in one line: what it found may take several)
        raise LedgerFileUnusable(
            f"{path} is damaged (quick_check: {'; '.join(found)}); restore the ledger from a backup"
        )


_INSERT_DEPOSIT = (
    "INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms, deposit_id)"
    " VALUES ('deposit', ?, ?, ?, ?, ?)"
)
#: the other half of a deposit: the money comes out of the issuance account
_ISSUE = "UPDATE issuance SET balance = balance - ? WHERE id = 1"


#: The writer connection's record of every balance it writes (temporary: this connection's
#: alone, and rolled back with the transaction that wrote it), read at the end of each batch
#: into :attr:`SqliteLedger` 's balance cache. Triggers, not each operation, so that no
#: operation that moves money can forget to tell the cache.
_BALANCES_SEEN = (
    "CREATE TEMP TABLE IF NOT EXISTS balances_seen (name_key TEXT PRIMARY KEY, balance INTEGER)",
    "CREATE TEMP TRIGGER IF NOT EXISTS balances_seen_insert AFTER INSERT ON main.accounts BEGIN"
    " INSERT OR REPLACE INTO balances_seen VALUES (new.name_key, new.balance); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS balances_seen_update AFTER UPDATE ON main.accounts BEGIN"
    " INSERT OR REPLACE INTO balances_seen SELECT old.name_key, NULL"
    " WHERE old.name_key IS NOT new.name_key;"
    " INSERT OR REPLACE INTO balances_seen VALUES (new.name_key, new.balance); END",
    "CREATE TEMP TRIGGER IF NOT EXISTS balances_seen_delete AFTER DELETE ON main.accounts BEGIN"
    " INSERT OR REPLACE INTO balances_seen VALUES (old.name_key, NULL); END",
)
#: at most this many balances are cached (beyond it the cache starts again, empty)
MAX_CACHED_BALANCES = 200_000


#: at most this many balances asked for and not cached wait for the next batch to read them
_MAX_MISSED = 10_000


def _read_balances(db: sqlite3.Connection, keys: list[str]) -> list[tuple[str, int | None]]:
    found: list[tuple[str, int | None]] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        found += db.execute(
            "SELECT name_key, balance FROM accounts"
            f" WHERE name_key IN ({', '.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
    return found


def _check_balances(db: sqlite3.Connection) -> None:
    """An empty operation: its batch checks whether another process wrote (see ``balance``)."""


_COLUMNS = (
    "seq, kind, payer, payee, amount, payer_balance_after, payee_balance_after, at_ms, payment_id,"
    " memo"
)
#: One side of an account's history (``{side}`` is ``payer`` or ``payee``), newest first: a
#: range of the ``movements_{side}`` index (``{side}``, ``seq``) read backwards from the cursor,
#: so a page costs about ``limit`` rows however long the history is. The other filters are
#: checked on the rows that range yields.
_SIDE = (
    "SELECT {columns} FROM movements"
    " WHERE {side} = :name AND seq < :before"
    " AND (:other IS NULL OR {other} = :other)"
    " AND at_ms >= :since AND at_ms < :until"
    " ORDER BY seq DESC LIMIT :limit"
)
#: Newest first from each side's index, then merged: reads about 2 x limit rows (an OR would
#: sort all of the account's movements).
_HISTORY = (
    f"SELECT * FROM ({_SIDE.format(columns=_COLUMNS, side='payer', other='payee')})"
    f" UNION ALL"
    f" SELECT * FROM ({_SIDE.format(columns=_COLUMNS, side='payee', other='payer')})"
    f" ORDER BY seq DESC LIMIT :limit"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


def _reader(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing ledger (at the current schema)."""
    db = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA query_only=ON")
    return db


def _stored_transfer(db: sqlite3.Connection, payment_id: uuid.UUID) -> Transfer | None:
    """The settled transfer with this payment id (``replayed``), if any."""
    row = db.execute(
        "SELECT payer, payee, amount, payer_balance_after, payee_balance_after, at_ms, memo"
        " FROM movements WHERE payment_id = ?",
        (str(payment_id),),
    ).fetchone()
    if row is None:
        return None
    payer, payee, amount, payer_after, payee_after, at_ms, memo = row
    return Transfer(payment_id, payer, payee, amount, payer_after, payee_after, at_ms, True, memo)


def _move(
    db: sqlite3.Connection,
    limits: Limits,
    payment_id: uuid.UUID,
    payer: str,
    payee: str,
    amount: int,
    memo: str | None,
    accepted_with: bytes | None,
) -> Transfer:
    """Move a new payment's money (inside the caller's transaction), or refuse having written
    nothing. ``accepted_with``: see :meth:`SqliteLedger.settle`."""
    payer_key, payee_key = name_key(payer), name_key(payee)
    if payer_key == payee_key:
        raise SelfPayment("you cannot pay yourself")
    if amount < 1 or amount > limits.max_payment:
        raise AmountOutOfRange(f"a payment must be within 1..{limits.max_payment}")
    # frozen and the payee's key are read here, inside the transaction, not from a
    # cache: an operator's freeze or password reset (another process, through this
    # file) holds from the next batch on.
    found = {
        key: (balance, kind, registered, frozen, current_key)
        for key, balance, kind, registered, frozen, current_key in db.execute(
            "SELECT name_key, balance, kind, name, frozen, peer_key"
            " FROM accounts WHERE name_key IN (?, ?)",
            (payer_key, payee_key),
        )
    }
    src, dst = found.get(payer_key), found.get(payee_key)
    if src is None:
        raise UnknownAccount(f"no account {payer!r}")
    if dst is None or dst[1] != src[1]:
        # Course accounts (no password) and native ones never pay each other.
        raise UnknownPayee(f"no account {payee!r}")
    src_name, dst_name = src[2], dst[2]  # as registered
    for name, (_, _, _, frozen, _) in ((src_name, src), (dst_name, dst)):
        if frozen:
            raise AccountFrozen(f"the account {name!r} is frozen")
    if accepted_with is not None and dst[4] != accepted_with:
        # Read here, not from a cache: a key revoked by an operator's password reset
        # (another process, through this file) stops counting at once.
        if dst[4] is None:
            raise Unauthorized(f"{dst_name} has no current peer key")
        raise Unauthorized(f"{dst_name}'s peer key changed since the acceptance")
    if src[0] < amount:
        raise InsufficientFunds(f"balance {src[0]} is less than {amount}")
    payer_after = src[0] - amount
    payee_after = dst[0] + amount
    if payee_after > limits.max_balance:
        raise BalanceLimit(f"{dst_name}'s balance would exceed {limits.max_balance}")
    now = _now_ms()
    db.execute(
        "UPDATE accounts SET balance = CASE name WHEN :payer THEN :payer_after"
        " ELSE :payee_after END WHERE name IN (:payer, :payee)",
        {
            "payer": src_name,
            "payer_after": payer_after,
            "payee": dst_name,
            "payee_after": payee_after,
        },
    )
    db.execute(
        "INSERT INTO movements(kind, payment_id, payer, payee, amount,"
        " payer_balance_after, payee_balance_after, at_ms, memo)"
        " VALUES ('transfer', ?, ?, ?, ?, ?, ?, ?, ?)",
        (str(payment_id), src_name, dst_name, amount, payer_after, payee_after, now, memo),
    )
    return Transfer(
        payment_id, src_name, dst_name, amount, payer_after, payee_after, now, memo=memo
    )


#: What :meth:`SqliteLedger.purge_requests` deletes (each term as a partial index has it):
#: requests closed before the cutoff, and open ones that expired before it.
_PURGEABLE = (
    "state <> 'open' AND closed_ms < ?",
    "state = 'open' AND expires_ms < ?",
)


def _request(row: tuple[Any, ...], now_ms: int) -> PaymentRequest:
    rid, requester, payer, amount, memo, created, expires, state, closed = row
    if state == "open" and expires <= now_ms:
        state = "expired"
    return PaymentRequest(
        uuid.UUID(rid), requester, payer, amount, memo, created, expires, state, closed
    )


class SqliteLedger:
    """The SQLite backend. Use :func:`open_sqlite_ledger`, which owns its writer task."""

    def __init__(
        self,
        path: Path | str,
        limits: Limits,
        max_batch: int = 512,
        *,
        connect: Callable[[str], sqlite3.Connection] = connect_sqlite,
        readers: int = 2,
        balance_ttl: float = 0.5,
        check_interval: float = 1.0,
    ) -> None:
        """``connect`` opens the writer's connection (creating and migrating the file);
        ``readers`` connections serve reads beside it (0, and always for ``":memory:"``:
        reads queue with the writes). ``balance_ttl``: see :meth:`balance` (0: no cache).
        ``check_interval``: seconds between looks at the file when no commit looks (see the
        module's docstring)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not check_interval > 0:
            raise ValueError("check_interval must be more than 0")
        if readers < 0:
            raise ValueError("readers must be 0 or more")
        self.path = str(path)
        self.limits = limits
        self.max_batch = max_batch
        self._connect = connect
        self._send, self._recv = trio.open_memory_channel[_Op[Any]](math.inf)
        # One dedicated connection, used by one thread at a time.
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        # Read-only connections, each used by one thread at a time (the limiter's count).
        if self.path == ":memory:":
            readers = 0  # an in-memory database is the writer connection's alone
        self._read_limiter = trio.CapacityLimiter(readers) if readers else None
        self._idle_readers: list[sqlite3.Connection] = []
        self.readers = readers
        # Reads wait here; each of ``readers`` tasks takes every read waiting and runs them in
        # one worker-thread call (like the writer's batches: a thread hop costs more than a
        # point read, and 50 users asking ``list`` at once made 50 hops).
        self._reads_send, self._reads = trio.open_memory_channel[_Op[Any]](math.inf)
        # Figures for the benchmark: how well group commit is doing.
        self.commits = 0
        self.ops_committed = 0
        self.observer: LedgerObserver | None = None
        # Balances as committed, kept by the writer thread, read by :meth:`balance` (the
        # ``list`` and course ``List`` replies) without a trip to a read connection. Hard
        # choice: another process (``p2ppay admin``) may write the file too, and nothing tells
        # us when. Each batch asks SQLite whether anyone else committed since the last one
        # (``PRAGMA data_version``) and forgets every balance if so; the cache is used only
        # while that check is under ``balance_ttl`` old, and :meth:`_keep_balances_checked`
        # runs an empty batch when nothing else did. So an operator's change shows within
        # ``balance_ttl``, and this process's own changes at once (they are in the cache
        # before their callers are answered).
        self.balance_ttl = balance_ttl
        self._balances: dict[str, int] = {}
        self._balances_checked = -math.inf  # time.monotonic() of the last batch's check
        self._balances_asked = trio.Event()  # set by :meth:`balance` when a check is due
        self._balances_missed: set[str] = set()  # asked for, not cached: the next batch reads them
        self._data_version: int | None = None
        #: how many :meth:`balance` answers came from the cache
        self.balance_cache_hits = 0
        # The file as opened, (st_dev, st_ino), and the largest size seen (a ledger in WAL
        # mode never shrinks: nothing here runs VACUUM). Looked at from the writer's thread
        # and the watcher's, under the lock; None for ":memory:".
        self.check_interval = check_interval
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._watch_lock = threading.Lock()
        #: why the file is no longer the ledger (then every call fails), once it is not
        self.lost_because: str | None = None
        #: set once the file is found deleted, replaced or truncated
        self.lost = trio.Event()

    # -- lifecycle --

    def _open_blocking(self) -> None:
        _quick_check(self.path)
        try:
            db = self._connect(self.path)
        except sqlite3.DatabaseError as exc:
            _raise_if_damaged(self.path, exc)
            raise
        try:
            for statement in _BALANCES_SEEN:
                db.execute(statement)
            if self.path != ":memory:":
                st = os.stat(self.path)
                self._identity, self._size = (st.st_dev, st.st_ino), st.st_size
        except BaseException:
            db.close()
            raise
        self._db = db

    def _check_file(self) -> str | None:
        """(Blocking.) Why the file at ``path`` is no longer the ledger opened, if it is not:
        deleted, replaced, truncated, or it cannot even be looked at. The first time, that
        is logged, and from then on every call fails."""
        if self._identity is None:
            return None
        with self._watch_lock:
            if self.lost_because is not None:
                return self.lost_because
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                problem = "was deleted"
            except OSError as exc:
                problem = f"cannot be looked at ({exc.strerror or exc})"
            else:
                if (st.st_dev, st.st_ino) != self._identity:
                    problem = "was replaced by another file"
                elif st.st_size < self._size:
                    problem = f"was truncated (from {self._size} to {st.st_size} bytes)"
                else:
                    self._size = st.st_size
                    return None
            self.lost_because = f"the ledger file {self.path} {problem}"
        log.error(
            "%s while the server had it open: nothing more is acknowledged (requests are "
            "answered internal_error). Stop the server and put the ledger back from a backup "
            "(README: Backups); nothing was written to whatever is at that path now",
            self.lost_because,
        )
        return self.lost_because

    def _refuse_if_lost(self) -> None:
        if self.lost_because is not None:
            raise LedgerFileUnusable(self.lost_because)

    def _watch_blocking(self, stop: threading.Event, token: trio.lowlevel.TrioToken) -> None:
        """(The watcher's own thread, until ``stop``.) Look at the file every
        ``check_interval`` seconds, and set :attr:`lost` when it is lost.

        A thread of the ledger's own, sleeping in real time, that a task of
        :func:`open_sqlite_ledger` owns (:func:`~p2ppay.ownthread.run_in_own_thread` says
        why neither a Trio timer nor a thread from Trio's cache)."""
        while not stop.wait(self.check_interval):
            if self._check_file() is not None:
                try:
                    token.run_sync_soon(self.lost.set)
                except trio.RunFinishedError:  # (cannot be: a task of the run awaits this thread)
                    pass
                return

    async def _writer(self, task_status: trio.TaskStatus[None]) -> None:
        await trio.to_thread.run_sync(self._open_blocking, limiter=self._limiter)
        task_status.started()
        try:
            async with self._recv:
                async for first in self._recv:
                    batch: list[_Op[Any]] = [first]
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(self._recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    # Not abandoned on cancel: a commit in flight always finishes and is answered.
                    await trio.to_thread.run_sync(self._run_batch, batch, limiter=self._limiter)
                    if self.lost_because is not None:
                        self.lost.set()
                    for op in batch:
                        op.done.set()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_blocking, limiter=self._limiter)

    def _close_blocking(self) -> None:
        while self._idle_readers:
            self._idle_readers.pop().close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _run_batch(self, batch: list[_Op[Any]]) -> None:
        db = self._db
        assert db is not None
        started = time.perf_counter()
        if self.lost_because is not None:
            for op in batch:
                op.error = LedgerFileUnusable(self.lost_because)
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            # What the file looks like now that we hold the write lock: nobody else can
            # commit until we do, so the cache, once this batch's balances are in it, is
            # exactly the file's (for the accounts it holds).
            (version,) = db.execute("PRAGMA data_version").fetchone()
            checked = time.monotonic()
            for op in batch:
                try:
                    op.result = op.fn(db)
                except LedgerError as exc:
                    # Every operation checks before it writes, so a refusal has written
                    # nothing: no savepoint to roll back to (that saves two statements an op).
                    op.error = exc
            seen = db.execute("SELECT name_key, balance FROM temp.balances_seen").fetchall()
            if seen:
                db.execute("DELETE FROM temp.balances_seen")
            if self._balances_missed:
                seen += _read_balances(db, self._take_missed())
            db.execute("COMMIT")
        except BaseException as exc:
            # Anything else (an I/O error, a constraint that should have been impossible)
            # may have left a half-done operation: none of the batch is kept or acknowledged.
            if db.in_transaction:
                db.rollback()
            # (a file truncated under SQLite fails like this: then that is what is said)
            lost = self._check_file() if isinstance(exc, Exception) else None
            for op in batch:
                op.result = None
                op.error = (
                    LedgerUnavailable(f"commit failed: {exc}")
                    if lost is None
                    else LedgerFileUnusable(lost)
                )
            if not isinstance(exc, Exception):
                raise
            return
        lost = self._check_file()  # committed, but into the file people mean by the path?
        if lost is not None:
            for op in batch:
                op.result = None
                op.error = LedgerFileUnusable(lost)
            return
        self._cache_balances(version, seen, checked)
        ops = sum(op.fn is not _check_balances for op in batch)
        if ops:
            self.commits += 1
            self.ops_committed += ops
            if self.observer is not None:
                self.observer.committed(ops, time.perf_counter() - started)

    def _take_missed(self) -> list[str]:
        # (the event loop may add one meanwhile, to the set being taken: it is asked for again)
        missed, self._balances_missed = self._balances_missed, set()
        return list(missed)

    def _cache_balances(
        self, version: int, seen: list[tuple[str, int | None]], checked: float
    ) -> None:
        # In the writer thread, after a commit. The event loop reads the dict meanwhile:
        # each step below is one dict operation (atomic under the GIL), and a reader that
        # meets the cache half-updated sees balances that were each committed.
        balances = self._balances
        if version != self._data_version or len(balances) > MAX_CACHED_BALANCES:
            balances.clear()  # another process committed: any balance may have changed
            self._data_version = version
        for key, balance in seen:
            if balance is None:
                balances.pop(key, None)
            else:
                balances[key] = balance
        self._balances_checked = checked

    def _run_reads(self, batch: list[_Op[Any]]) -> None:
        # In a worker thread. One read transaction for the batch: a consistent snapshot of
        # what was committed before any of these reads was asked for (they all were queued
        # before it began), which is all a read promises.
        db = self._idle_readers.pop() if self._idle_readers else _reader(self.path)
        try:
            db.execute("BEGIN")
            try:
                for op in batch:
                    try:
                        op.result = op.fn(db)
                    except sqlite3.Error as exc:
                        op.error = LedgerUnavailable(f"read failed: {exc}")
                    except Exception as exc:  # a LedgerError, or a bug: that caller's alone
                        op.error = exc
            finally:
                db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            for op in batch:
                if op.error is None:
                    op.result = None
                    op.error = LedgerUnavailable(f"read failed: {exc}")
        finally:
            self._idle_readers.append(db)

    async def _reader_task(self) -> None:
        """Run reads in batches, one worker-thread call each, until the ledger closes."""
        async for first in self._reads:
            batch: list[_Op[Any]] = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._reads.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await trio.to_thread.run_sync(self._run_reads, batch, limiter=self._read_limiter)
            except sqlite3.Error as exc:  # opening a read connection failed
                for op in batch:
                    op.error = LedgerUnavailable(f"read failed: {exc}")
            finally:
                for op in batch:
                    op.done.set()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on a read connection (or, with no readers, in the writer's queue)."""
        if self._read_limiter is None:
            return await self._submit(fn)
        self._refuse_if_lost()
        if self._db is None:
            raise LedgerUnavailable("the ledger is closed")
        op: _Op[T] = _Op(fn)
        try:
            self._reads_send.send_nowait(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LedgerUnavailable("the ledger is closed") from None
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._refuse_if_lost()
        op: _Op[T] = _Op(fn)
        try:
            self._send.send_nowait(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LedgerUnavailable("the ledger is closed") from None
        # If our caller is cancelled here the operation still commits (or not) as a whole;
        # a settlement retried with the same payment id then finds the stored outcome.
        await op.done.wait()
        if op.error is not None:
            if isinstance(op.error, LedgerError):
                raise op.error
            raise LedgerUnavailable(str(op.error)) from op.error
        return op.result  # type: ignore[return-value]

    # -- operations (the bodies run in the writer's thread, inside the batch transaction) --

    async def create_account(
        self,
        name: str,
        password_hash: str | None,
        kind: AccountKind = "native",
        initial_deposit: int = 0,
    ) -> Account:
        if initial_deposit < 0 or initial_deposit > self.limits.max_deposit:
            raise AmountOutOfRange(f"initial deposit must be within 0..{self.limits.max_deposit}")

        def op(db: sqlite3.Connection) -> Account:
            now = _now_ms()
            try:
                db.execute(
                    "INSERT INTO accounts(name, name_key, kind, password_hash, balance, created_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (name, name_key(name), kind, password_hash, initial_deposit, now),
                )
            except sqlite3.IntegrityError:
                raise NameTaken(f"the name {name!r} is taken") from None
            if initial_deposit:
                db.execute(_INSERT_DEPOSIT, (name, initial_deposit, initial_deposit, now, None))
                db.execute(_ISSUE, (initial_deposit,))
            return Account(name, kind, password_hash, initial_deposit)

        return await self._submit(op)

    async def account(self, name: str) -> Account | None:
        def op(db: sqlite3.Connection) -> Account | None:
            row = db.execute(
                "SELECT name, kind, password_hash, balance, peer_key, peer_key_expires_ms"
                " FROM accounts WHERE name_key = ?",
                (name_key(name),),
            ).fetchone()
            return None if row is None else Account(*row)

        return await self._read(op)

    async def balance(self, name: str) -> int | None:
        """``name``'s balance (None: no such account), for ``list`` replies.

        From the cache when it holds the account and was checked under ``balance_ttl`` ago
        (see ``__init__``); else read like :meth:`account`."""
        self._refuse_if_lost()
        if self.balance_ttl > 0:
            key = name_key(name)
            age = time.monotonic() - self._balances_checked
            if age >= self.balance_ttl / 2:
                self._balances_asked.set()
            if age < self.balance_ttl:
                cached = self._balances.get(key)
                if cached is not None:
                    self.balance_cache_hits += 1
                    return cached
            if key not in self._balances and len(self._balances_missed) < _MAX_MISSED:
                self._balances_missed.add(key)  # the next batch caches it
        account = await self.account(name)
        return None if account is None else account.balance

    async def _keep_balances_checked(self) -> None:
        """While :meth:`balance` is being asked, make sure a batch checks for other writers
        at least every half ``balance_ttl`` (an empty one when there is no other work).
        Idle, it waits without a deadline (no timer ticks on a server nobody asks)."""
        while True:
            await self._balances_asked.wait()
            self._balances_asked = trio.Event()
            if time.monotonic() - self._balances_checked >= self.balance_ttl / 2:
                try:
                    await self._submit(_check_balances)
                except LedgerUnavailable:
                    pass  # the cache goes unused until a batch succeeds again
            await trio.sleep(self.balance_ttl / 2)  # at most one empty batch per half ttl

    async def set_peer_key(self, name: str, key_der: bytes | None, expires_ms: int | None) -> None:
        """Make ``key_der`` the account's current peer key; None revokes the current one."""

        def op(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE accounts SET peer_key = ?, peer_key_expires_ms = ? WHERE name_key = ?",
                (key_der, expires_ms, name_key(name)),
            )
            if cur.rowcount != 1:
                raise UnknownAccount(f"no account {name!r}")

        await self._submit(op)

    async def transfer(self, payment_id: uuid.UUID) -> Transfer | None:
        """The settled transfer with this payment id, if any."""

        def op(db: sqlite3.Connection) -> Transfer | None:
            return _stored_transfer(db, payment_id)

        return await self._read(op)

    async def deposit(self, name: str, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        limits = self.limits
        if amount < 1 or amount > limits.max_deposit:
            raise AmountOutOfRange(f"a deposit must be within 1..{limits.max_deposit}")
        did = None if deposit_id is None else str(deposit_id)

        def op(db: sqlite3.Connection) -> int:
            if did is not None:
                done = db.execute(
                    "SELECT payee, amount, payee_balance_after FROM movements WHERE deposit_id = ?",
                    (did,),
                ).fetchone()
                if done is not None:
                    if name_key(done[0]) != name_key(name) or done[1] != amount:
                        raise DepositIdConflict(
                            f"deposit {did} was already used for a different deposit"
                        )
                    return int(done[2])  # the first outcome; nothing moves again
            row = db.execute(
                "SELECT name, balance, frozen FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if row is None:
                raise UnknownAccount(f"no account {name!r}")
            registered, balance, frozen = row[0], row[1] + amount, row[2]
            if frozen:
                raise AccountFrozen(f"the account {registered!r} is frozen")
            if balance > limits.max_balance:
                raise BalanceLimit(f"the balance would exceed {limits.max_balance}")
            db.execute("UPDATE accounts SET balance = ? WHERE name = ?", (balance, registered))
            db.execute(_INSERT_DEPOSIT, (registered, amount, balance, _now_ms(), did))
            db.execute(_ISSUE, (amount,))
            return int(balance)

        return await self._submit(op)

    async def change_password(self, name: str, password_hash: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "UPDATE accounts SET password_hash = ? WHERE name_key = ? AND kind = 'native'",
                (password_hash, name_key(name)),
            )
            if cur.rowcount != 1:
                raise UnknownAccount(f"no native account {name!r}")

        await self._submit(op)

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        accepted_with: bytes | None = None,
        memo: str | None = None,
    ) -> Transfer:
        """Move ``amount`` from ``payer`` to ``payee`` once per ``payment_id``.

        For a payment not settled before, with ``accepted_with`` (the DER public key the payee's
        acceptance was checked against, by the caller, before this call), the payee's current
        key must still be that one: a key replaced or revoked since (a newer login, a logout,
        an operator's password reset) refuses it (:class:`Unauthorized`). A retry of a settled
        payment gets its stored outcome whatever the key now is."""
        limits = self.limits

        def op(db: sqlite3.Connection) -> Transfer:
            stored = _stored_transfer(db, payment_id)
            if stored is not None:
                if (name_key(stored.payer), name_key(stored.payee), stored.amount, stored.memo) != (
                    name_key(payer),
                    name_key(payee),
                    amount,
                    memo,
                ):
                    raise PaymentIdConflict(
                        f"payment {payment_id} was already used for a different payment"
                    )
                return stored
            return _move(db, limits, payment_id, payer, payee, amount, memo, accepted_with)

        started, outcome = time.perf_counter(), "cancelled"
        try:
            transfer = await self._submit(op)
            outcome = "replayed" if transfer.replayed else "ok"
            return transfer
        except LedgerError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            if self.observer is not None:
                self.observer.settled(outcome, time.perf_counter() - started)

    async def history(
        self,
        name: str,
        limit: int,
        *,
        before: int | None = None,
        counterparty: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[Entry]:
        def op(db: sqlite3.Connection) -> list[Entry]:
            found = db.execute(
                "SELECT name FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if found is None:
                return []
            registered = found[0]
            other: str | None = None
            if counterparty is not None:
                row = db.execute(
                    "SELECT name FROM accounts WHERE name_key = ?", (name_key(counterparty),)
                ).fetchone()
                if row is None:
                    return []
                other = row[0]
            params = history_params(registered, other, limit, before, since_ms, until_ms)
            return history_entries(db.execute(_HISTORY, params).fetchall(), registered)

        return await self._read(op)

    async def audit(self) -> Audit:
        def op(db: sqlite3.Connection) -> Audit:
            total, low, count = db.execute(
                "SELECT COALESCE(SUM(balance), 0), MIN(balance), COUNT(*) FROM accounts"
            ).fetchone()
            issued, withdrawn, transfers = db.execute(
                "SELECT COALESCE(SUM(CASE WHEN payer IS NULL THEN amount END), 0),"
                " COALESCE(SUM(CASE WHEN payee IS NULL THEN amount END), 0),"
                " COUNT(payment_id) FROM movements"
            ).fetchone()
            (issuance,) = db.execute("SELECT balance FROM issuance WHERE id = 1").fetchone()
            return Audit(total, issued, low, count, transfers, withdrawn, issuance)

        return await self._read(op)

    async def invalid_names(self) -> list[str]:
        """Accounts whose names the name rule (p2ppay.names) refuses: made by an older p2ppay
        whose rule was looser, they cannot log in."""

        def op(db: sqlite3.Connection) -> list[str]:
            names = (row[0] for row in db.execute("SELECT name FROM accounts ORDER BY name"))
            return [name for name in names if not is_valid_name(name)]

        return await self._read(op)

    # -- payment requests --

    async def create_request(
        self,
        request_id: uuid.UUID,
        requester: str,
        payer: str,
        amount: int,
        memo: str | None,
        expires_ms: int,
        max_open: int,
        max_per_payer: int,
    ) -> PaymentRequest:
        limits = self.limits
        if amount < 1 or amount > limits.max_payment:
            raise AmountOutOfRange(f"a payment must be within 1..{limits.max_payment}")

        def op(db: sqlite3.Connection) -> PaymentRequest:
            if name_key(requester) == name_key(payer):
                raise SelfPayment("you cannot ask yourself to pay you")
            found = {
                key: registered
                for key, registered in db.execute(
                    "SELECT name_key, name FROM accounts"
                    " WHERE name_key IN (?, ?) AND kind = 'native'",
                    (name_key(requester), name_key(payer)),
                )
            }
            me, them = found.get(name_key(requester)), found.get(name_key(payer))
            if me is None:
                raise UnknownAccount(f"no account {requester!r}")
            if them is None:
                raise UnknownAccount(f"no account named {payer!r}")
            now = _now_ms()
            (count,) = db.execute(
                "SELECT COUNT(*) FROM payment_requests"
                " WHERE requester = ? AND state = 'open' AND expires_ms > ?",
                (me, now),
            ).fetchone()
            if count >= max_open:
                raise TooManyRequests(f"you have {count} open requests already")
            # Counted per requester, not in all: otherwise anyone could fill the payer's
            # quota and so stop everyone else from asking it for money.
            (count,) = db.execute(
                "SELECT COUNT(*) FROM payment_requests WHERE payer = ? AND requester = ?"
                " AND state = 'open' AND expires_ms > ?",
                (them, me, now),
            ).fetchone()
            if count >= max_per_payer:
                raise TooManyRequests(f"{them} has {count} open requests of yours already")
            db.execute(
                "INSERT INTO payment_requests(id, requester, payer, amount, memo,"
                " created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(request_id), me, them, amount, memo, now, expires_ms),
            )
            return PaymentRequest(request_id, me, them, amount, memo, now, expires_ms, "open")

        return await self._submit(op)

    async def open_requests(self, name: str, limit: int) -> OpenRequests:
        def op(db: sqlite3.Connection) -> OpenRequests:
            found = db.execute(
                "SELECT name FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if found is None:
                return OpenRequests([], [], 0, 0)
            now = _now_ms()
            me = found[0]
            lists, totals = [], []
            for column, order in (("payer", INCOMING_REQUEST_ORDER), ("requester", "")):
                rows = db.execute(
                    f"SELECT {REQUEST_COLUMNS} FROM payment_requests AS r"
                    f" WHERE {column} = ? AND state = 'open' AND expires_ms > ?"
                    f" ORDER BY {order}created_ms DESC, id LIMIT ?",
                    (me, now, limit),
                ).fetchall()
                lists.append([_request(row, now) for row in rows])
                (total,) = db.execute(
                    f"SELECT COUNT(*) FROM payment_requests"
                    f" WHERE {column} = ? AND state = 'open' AND expires_ms > ?",
                    (me, now),
                ).fetchone()
                totals.append(total)
            return OpenRequests(lists[0], lists[1], totals[0], totals[1])

        return await self._read(op)

    async def purge_requests(self, closed_before_ms: int, limit: int) -> int:
        def op(db: sqlite3.Connection) -> int:
            deleted = 0
            for where in _PURGEABLE:
                deleted += db.execute(
                    "DELETE FROM payment_requests WHERE id IN"
                    f" (SELECT id FROM payment_requests WHERE {where} LIMIT ?)",
                    (closed_before_ms, limit - deleted),
                ).rowcount
            return deleted

        return await self._submit(op)

    async def pay_request(
        self, request_id: uuid.UUID, payer: str
    ) -> tuple[Transfer, PaymentRequest]:
        limits = self.limits

        def op(db: sqlite3.Connection) -> tuple[Transfer, PaymentRequest]:
            row = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE id = ?",
                (str(request_id),),
            ).fetchone()
            now = _now_ms()
            request = None if row is None else _request(row, now)
            if request is None or name_key(request.payer) != name_key(payer):
                raise UnknownRequest(f"no request {request_id} asks you to pay")
            stored = _stored_transfer(db, request_id)
            if request.state == "paid" and stored is not None:
                return stored, request  # a retry: the first outcome, nothing moves
            if request.state != "open":
                raise request.refusal()
            if stored is not None:  # the payer used the request's id for another payment
                raise PaymentIdConflict(f"payment {request_id} was already used")
            transfer = _move(
                db,
                limits,
                request_id,
                request.payer,
                request.requester,
                request.amount,
                request.memo,
                None,  # the requester's consent is the request itself
            )
            db.execute(
                "UPDATE payment_requests SET state = 'paid', closed_ms = ?, told = 0 WHERE id = ?",
                (transfer.at_ms, str(request_id)),
            )
            return transfer, dataclasses.replace(request, state="paid", closed_ms=transfer.at_ms)

        return await self._submit(op)

    async def close_request(
        self, request_id: uuid.UUID, name: str, state: Literal["declined", "cancelled"]
    ) -> PaymentRequest:
        def op(db: sqlite3.Connection) -> PaymentRequest:
            row = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE id = ?",
                (str(request_id),),
            ).fetchone()
            now = _now_ms()
            request = None if row is None else _request(row, now)
            party = None
            if request is not None:
                party = request.payer if state == "declined" else request.requester
            if request is None or party is None or name_key(party) != name_key(name):
                who = "asks you to pay" if state == "declined" else "is yours"
                raise UnknownRequest(f"no request {request_id} {who}")
            if request.state != "open":
                raise request.refusal()
            # A declined request is news for its requester; a cancelled one is not.
            db.execute(
                "UPDATE payment_requests SET state = ?, closed_ms = ?, told = ? WHERE id = ?",
                (state, now, 0 if state == "declined" else 1, str(request_id)),
            )
            return dataclasses.replace(request, state=state, closed_ms=now)

        return await self._submit(op)

    async def request_news(self, name: str) -> list[PaymentRequest]:
        def op(db: sqlite3.Connection) -> list[PaymentRequest]:
            found = db.execute(
                "SELECT name FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if found is None:
                return []
            now = _now_ms()
            rows = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM payment_requests"
                f" WHERE requester = ? AND told = 0 ORDER BY closed_ms, id",
                (found[0],),
            ).fetchall()
            if rows:
                db.execute(
                    "UPDATE payment_requests SET told = 1 WHERE requester = ? AND told = 0",
                    (found[0],),
                )
            return [_request(row, now) for row in rows]

        def any_news(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM payment_requests WHERE told = 0 AND requester ="
                " (SELECT name FROM accounts WHERE name_key = ?) LIMIT 1",
                (name_key(name),),
            ).fetchone()
            return row is not None

        # Most logins have no news: a read beside the writer, not a place in its queue.
        if not await self._read(any_news):
            return []
        return await self._submit(op)

    async def told(self, request_id: uuid.UUID) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("UPDATE payment_requests SET told = 1 WHERE id = ?", (str(request_id),))

        await self._submit(op)

    async def record_login(self, name: str) -> None:
        """Remember when ``name`` last logged in (for the operator's account list)."""

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE accounts SET last_login_ms = ? WHERE name_key = ?",
                (_now_ms(), name_key(name)),
            )

        await self._submit(op)


@asynccontextmanager
async def open_sqlite_ledger(
    path: Path | str,
    limits: Limits | None = None,
    *,
    max_batch: int = 512,
    connect: Callable[[str], sqlite3.Connection] = connect_sqlite,
    readers: int = 2,
    balance_ttl: float = 0.5,
    check_interval: float = 1.0,
) -> AsyncIterator[SqliteLedger]:
    """Open (creating if needed) the ledger at ``path``; on exit, drain queued work and close."""
    ledger = SqliteLedger(
        path, limits or Limits(), max_batch, connect=connect, readers=readers,
        balance_ttl=balance_ttl, check_interval=check_interval,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger._writer)
        for _ in range(ledger.readers):
            nursery.start_soon(ledger._reader_task)
        stop_watching = threading.Event()  # (set on the way out, whatever the way)
        if ledger._identity is not None:
            watch = partial(
                ledger._watch_blocking, stop_watching, trio.lowlevel.current_trio_token()
            )
            nursery.start_soon(partial(run_in_own_thread, watch, name="p2ppay-ledger-watcher"))
        checker = trio.CancelScope()
        if balance_ttl > 0:

            async def keep_checked() -> None:
                with checker:
                    await ledger._keep_balances_checked()

            nursery.start_soon(keep_checked)
        try:
            yield ledger
        finally:
            checker.cancel()
            stop_watching.set()
            # Closing the channels lets the writer and the readers finish what is queued,
            # then stop.
            ledger._send.close()
            ledger._reads_send.close()
