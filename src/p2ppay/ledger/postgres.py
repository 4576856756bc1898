"""Where money moves, when it lives in PostgreSQL: the same ledger as :mod:`.sqlite`, shared by
any number of p2ppay nodes (processes, machines) on one database.

Same semantics as the SQLite ledger. Every write is an *operation* handed to one writer task,
which takes all the operations waiting (up to ``max_batch``) and runs them in one READ
COMMITTED transaction on its own connection, in a worker thread (psycopg's async mode is
asyncio-only, so this is sync psycopg, like sqlite3). Callers are answered only after COMMIT.
A refusal (a :class:`~.interface.LedgerError`) writes nothing, so it leaves the batch intact;
any other failure rolls the batch back and everyone in it gets :class:`LedgerUnavailable`. A
batch that meets a deadlock (40P01) or a serialization failure (40001), which other nodes'
batches can cause, is retried whole, up to :data:`RETRIES` times; one whose connection turns
out to be dead before its COMMIT was sent (PostgreSQL dropped it) is retried once on a new one.

Nothing waits for PostgreSQL for ever (:mod:`.pgtimeouts`): every connection has TCP
keepalives and ``tcp_user_timeout``, the writer's and the readers' sessions a statement and a
lock timeout (PostgreSQL's, a little shorter), and each batch and each read a client-side
deadline of the statement timeout, after which its connection is cut (the batch is answered
:class:`LedgerUnavailable`, and the next one opens a new connection).

Settles cost one round trip per batch: consecutive settles in the queue go to the server-side
function ``p2ppay_settle_batch`` (:mod:`.pgschema`) in one call, which locks the accounts they
name in ``name_key`` order (so nodes queue instead of deadlocking), then, for each in turn,
looks for an earlier settle of its payment id (after the locks: a node settling the same id
at the same moment is waited for, and its outcome replayed) and applies or refuses it. Other
operations run as their own statements, in queue order between the runs of settles.

Reads (an account, a transfer, a history, the audit) run on a small pool of read connections,
each used by one thread at a time, so they never wait behind a commit.

Events across nodes (the contract another node relies on): for each *new* transfer (not for a
replay, not for a refusal), the settle transaction runs ``pg_notify(channel, payload)``, where
``channel`` is the payee's node's (``pgschema.node_channel`` of the node id in the payee's
``presence`` row) or, when the payee has no row, ``p2ppay_settled`` (every node), with the JSON
object payload::

    {"payment_id": str, "payer": str, "payee": str, "amount": int,
     "payer_balance": int, "payee_balance": int, "at_ms": int, "memo": str}

(``memo`` only when the transfer has one),

names as registered, balances right after the transfer. PostgreSQL delivers it to every
connection that has run ``LISTEN`` on that channel only after the transaction commits, and
never if it rolls back, so an event can never announce money that was not committed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Generic, Literal, TypeVar

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

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
from p2ppay.ledger.pgschema import PgConnection, connect_postgres, describe, open_connection
from p2ppay.ledger.pgtimeouts import PgTimeouts, Watchdog, Watchdogs
from p2ppay.wire.names import is_valid_name, name_key

T = TypeVar("T")

#: How many times a batch is tried when PostgreSQL reports a deadlock or a serialization failure.
RETRIES: Final = 8
#: The channel new transfers are announced on (see the module's docstring).
SETTLED_CHANNEL: Final = "p2ppay_settled"

_INSERT_DEPOSIT = (
    "INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms, deposit_id)"
    " VALUES ('deposit', %s, %s, %s, %s, %s)"
)
_ISSUE = "UPDATE issuance SET balance = balance - %s WHERE id = 1"
_COLUMNS = (
    "seq, kind, payer, payee, amount, payer_balance_after, payee_balance_after, at_ms, payment_id,"
    " memo"
)
#: One side of an account's history (``{side}`` is ``payer`` or ``payee``), newest first: a
#: backward range of the ``movements_{side}`` index (``{side}``, ``seq``) from the cursor, so
#: a page costs about ``limit`` rows however long the history is; the other filters are
#: checked on the rows that range yields.
_SIDE = (
    "SELECT {columns} FROM movements"
    " WHERE {side} = %(name)s AND seq < %(before)s"
    " AND (%(other)s::text IS NULL OR {other} = %(other)s::text)"
    " AND at_ms >= %(since)s AND at_ms < %(until)s"
    " ORDER BY seq DESC LIMIT %(limit)s"
)
_HISTORY = (
    f"({_SIDE.format(columns=_COLUMNS, side='payer', other='payee')})"
    f" UNION ALL"
    f" ({_SIDE.format(columns=_COLUMNS, side='payee', other='payer')})"
    f" ORDER BY seq DESC LIMIT %(limit)s"
)
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Settle:
    """What a settle asks of ``p2ppay_settle_batch``, and how to answer its caller."""

    __slots__ = ("accepted_with", "amount", "memo", "payee", "payer", "payment_id")

    def __init__(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        accepted_with: bytes | None,
        memo: str | None = None,
    ) -> None:
        self.memo = memo
        self.payment_id = payment_id
        self.payer = payer
        self.payee = payee
        self.amount = amount
        self.accepted_with = accepted_with

    def as_json(self) -> dict[str, object]:
        return {
            "pid": str(self.payment_id),
            "payer_key": name_key(self.payer),
            "payee_key": name_key(self.payee),
            "amount": self.amount,
            "key": None if self.accepted_with is None else self.accepted_with.hex(),
            "memo": self.memo,
        }

    def outcome(self, row: Sequence[Any], limits: Limits) -> Transfer | LedgerError:
        """The function's row for this settle, as the caller's answer."""
        code, payer, payee, amount, payer_after, payee_after, at_ms, memo = row
        pid = self.payment_id
        if code in ("ok", "replayed"):
            return Transfer(
                pid, payer, payee, amount, payer_after, payee_after, at_ms, code == "replayed", memo
            )
        errors: dict[str, Callable[[], LedgerError]] = {
            "PaymentIdConflict": lambda: PaymentIdConflict(
                f"payment {pid} was already used for a different payment"
            ),
            "SelfPayment": lambda: SelfPayment("you cannot pay yourself"),
            "AmountOutOfRange": lambda: AmountOutOfRange(
                f"a payment must be within 1..{limits.max_payment}"
            ),
            "UnknownAccount": lambda: UnknownAccount(f"no account {self.payer!r}"),
            "UnknownPayee": lambda: UnknownPayee(f"no account {self.payee!r}"),
            "AccountFrozen": lambda: AccountFrozen(f"the account {payer!r} is frozen"),
            "NoPeerKey": lambda: Unauthorized(f"{payee} has no current peer key"),
            "KeyChanged": lambda: Unauthorized(f"{payee}'s peer key changed since the acceptance"),
            "InsufficientFunds": lambda: InsufficientFunds(
                f"balance {payer_after} is less than {self.amount}"
            ),
            "BalanceLimit": lambda: BalanceLimit(
                f"{payee}'s balance would exceed {limits.max_balance}"
            ),
        }
        make = errors.get(code)
        if make is None:  # a function from a p2ppay that this one does not know
            raise LedgerUnavailable(f"the settle function answered {code!r}")
        return make()


def _stored_transfer(db: PgConnection, payment_id: uuid.UUID) -> Transfer | None:
    """The settled transfer with this payment id (``replayed``), if any."""
    row = db.execute(
        "SELECT payer, payee, amount, payer_balance_after, payee_balance_after, at_ms, memo"
        " FROM movements WHERE payment_id = %s",
        (payment_id,),
    ).fetchone()
    if row is None:
        return None
    payer, payee, amount, payer_after, payee_after, at_ms, memo = row
    return Transfer(payment_id, payer, payee, amount, payer_after, payee_after, at_ms, True, memo)


#: What :meth:`PostgresLedger.purge_requests` deletes (each as a partial index has it).
_PURGEABLE = (
    "state <> 'open' AND closed_ms < %s",
    "state = 'open' AND expires_ms < %s",
)


def _request(row: Sequence[Any], now_ms: int) -> PaymentRequest:
    rid, requester, payer, amount, memo, created, expires, state, closed = row
    if state == "open" and expires <= now_ms:
        state = "expired"
    return PaymentRequest(rid, requester, payer, amount, memo, created, expires, state, closed)


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "result", "settle")

    def __init__(self, fn: Callable[[PgConnection], T] | None, settle: _Settle | None) -> None:
        self.fn = fn
        self.settle = settle
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class PostgresLedger:
    """The PostgreSQL backend. Use :func:`open_postgres_ledger`, which owns its writer task."""

    def __init__(
        self,
        url: str,
        limits: Limits,
        max_batch: int = 512,
        *,
        readers: int = 2,
        timeouts: PgTimeouts | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if readers < 1:
            raise ValueError("readers must be 1 or more")
        self.url = url
        self.limits = limits
        self.max_batch = max_batch
        self.timeouts = timeouts or PgTimeouts()
        self._watchdogs = Watchdogs(self.timeouts.watchdog)
        self._send, self._recv = trio.open_memory_channel[_Op[Any]](math.inf)
        self._limiter = trio.CapacityLimiter(1)  # the writer's connection: one thread at a time
        self._db: PgConnection | None = None
        self._read_limiter = trio.CapacityLimiter(readers)
        self._idle_readers: list[PgConnection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        # Figures for the benchmark: how well group commit is doing.
        self.commits = 0
        self.ops_committed = 0
        #: batches tried again after a deadlock or a serialization failure
        self.retries = 0
        #: batches and reads tried again on a new connection, the one they had being dead
        self.reconnected = 0
        self.observer: LedgerObserver | None = None

    # -- lifecycle --

    def _open_blocking(self) -> None:
        # Migrated on a connection without the statement timeout (a migration may take
        # long); the writer's own, with it, is opened by its first batch.
        connect_postgres(self.url, self.timeouts).close()

    async def _writer(self, task_status: trio.TaskStatus[None]) -> None:
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
                    # Not abandoned on cancel: a commit in flight always finishes and is
                    # answered, within the watchdog's limit.
                    await trio.to_thread.run_sync(
                        self._run_batch, batch, self._watchdogs.call(), limiter=self._limiter
                    )
                    for op in batch:
                        op.done.set()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_blocking, limiter=self._limiter)

    def _close_blocking(self) -> None:
        with self._readers_lock:
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for db in idle:
            db.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the writer (in its thread) --

    def _run_batch(self, batch: list[_Op[Any]], watchdog: Watchdog) -> None:
        started = time.perf_counter()
        try:
            if not self._try_batch(batch, watchdog):
                return
        finally:
            watchdog.release()
        self.commits += 1
        self.ops_committed += len(batch)
        if self.observer is not None:
            self.observer.committed(len(batch), time.perf_counter() - started)

    def _try_batch(self, batch: list[_Op[Any]], watchdog: Watchdog) -> bool:
        """Commit ``batch``, or answer every op in it with an error (False)."""
        failure: BaseException | None = None
        contended = 0
        anew = False  # tried again on a new connection already (at most once)
        while contended < RETRIES:
            for op in batch:
                op.result, op.error = None, None
            committing = False
            try:
                if watchdog.fired:
                    raise LedgerUnavailable("out of time")
                if self._db is None or self._db.closed or self._db.broken:
                    self._reconnect()
                db = self._db
                assert db is not None
                watchdog.watch(db)
                self._apply(db, batch)
                if db.info.transaction_status != TransactionStatus.INTRANS:
                    # A failed statement PostgreSQL would turn our COMMIT into a ROLLBACK for.
                    raise LedgerUnavailable("the transaction failed")
                committing = True
                db.commit()
                return True
            except _RETRYABLE as exc:
                self._rollback()
                self.retries += 1
                contended += 1
                failure = exc
                # A little, growing, random pause: the other node's batch, which won, can
                # take the rows back before this one does it again.
                time.sleep(random.uniform(0, 0.002 * contended))
            except BaseException as exc:
                lost = self._db is not None and self._db.broken
                # Anything else (a lost connection, a timeout, a constraint that should have
                # been impossible) may have left a half-done operation: none of it is kept.
                self._rollback()
                if (
                    lost
                    and not committing
                    and not anew
                    and not watchdog.fired
                    and isinstance(exc, psycopg.OperationalError)
                ):
                    # The connection was dead before our COMMIT was sent (PostgreSQL dropped
                    # it: a restart, a failover, pg_terminate_backend): nothing of the batch
                    # can have committed, so it is tried once more, on a new connection.
                    # During COMMIT nobody can tell whether it committed: no second try.
                    anew = True
                    self.reconnected += 1
                    continue
                reason = f"commit failed: {' '.join(str(exc).split())}"  # one line, for the log
                if watchdog.fired:
                    reason = f"PostgreSQL did not answer within {watchdog.limit:g} s" + (
                        " (the batch may have been committed)" if committing else ""
                    )
                for op in batch:
                    op.result = None
                    op.error = LedgerUnavailable(reason)
                if not isinstance(exc, Exception):
                    raise
                return False
        for op in batch:
            op.result = None
            op.error = LedgerUnavailable(
                f"commit failed {RETRIES} times over (contention): {failure}"
            )
        return False

    def _reconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._db = open_connection(
            self.url,
            self.timeouts,
            sessions=True,
            autocommit=False,
            application_name=f"p2ppay ledger writer {os.getpid()}",
        )

    def _rollback(self) -> None:
        db = self._db
        if db is None:
            return
        try:
            db.rollback()
        except psycopg.Error:
            # The connection is gone; the next batch opens another.
            db.close()
            self._db = None

    def _apply(self, db: PgConnection, batch: list[_Op[Any]]) -> None:
        """Run the batch's operations in queue order, each run of settles in one call."""
        i = 0
        while i < len(batch):
            op = batch[i]
            if op.fn is not None:
                try:
                    op.result = op.fn(db)
                except LedgerError as exc:
                    # Every operation checks before it writes: a refusal has written nothing.
                    op.error = exc
                i += 1
                continue
            j = i
            while j < len(batch) and batch[j].settle is not None:
                j += 1
            self._settle_run(db, batch[i:j])
            i = j

    def _settle_run(self, db: PgConnection, ops: list[_Op[Any]]) -> None:
        settles = [op.settle for op in ops if op.settle is not None]
        limits = self.limits
        rows = db.execute(
            "SELECT * FROM p2ppay_settle_batch(%s, %s, %s, %s)",
            (
                Jsonb([s.as_json() for s in settles]),
                limits.max_payment,
                limits.max_balance,
                _now_ms(),
            ),
        ).fetchall()
        if len(rows) != len(ops):
            raise LedgerUnavailable(f"the settle function answered {len(rows)} of {len(ops)}")
        for op, settle, row in zip(ops, settles, rows, strict=True):
            outcome = settle.outcome(row, limits)
            if isinstance(outcome, LedgerError):
                op.error = outcome
            else:
                op.result = outcome

    # -- reads (in a worker thread, on a read connection) --

    def _new_reader(self) -> PgConnection:
        db = open_connection(
            self.url,
            self.timeouts,
            sessions=True,
            autocommit=False,
            application_name=f"p2ppay ledger reader {os.getpid()}",
        )
        # A consistent snapshot of committed data for reads of several statements.
        db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        db.read_only = True
        return db

    def _read_on(self, db: PgConnection, fn: Callable[[PgConnection], T], watchdog: Watchdog) -> T:
        """``fn`` on ``db``, which goes back to the pool after; closed by the caller if not."""
        watchdog.watch(db)
        try:
            result = fn(db)
            db.rollback()
        finally:
            watchdog.release()
        with self._readers_lock:
            if not self._closed:
                self._idle_readers.append(db)
                return result
        db.close()
        return result

    def _run_read(self, fn: Callable[[PgConnection], T], watchdog: Watchdog) -> T:
        with self._readers_lock:
            if self._closed:
                raise LedgerUnavailable("the ledger is closed")
            pooled = self._idle_readers.pop() if self._idle_readers else None
        try:
            if pooled is not None:
                try:
                    return self._read_on(pooled, fn, watchdog)
                except psycopg.OperationalError:
                    lost = pooled.broken  # (read before close(), which clears it)
                    pooled.close()
                    # Dropped by PostgreSQL while it was idle in the pool (a restart, a
                    # failover, pg_terminate_backend): once more, on a new connection. Not
                    # when the watchdog cut it: that one had its time.
                    if watchdog.fired or not lost:
                        raise
                    with self._readers_lock:  # (readers run in threads of their own)
                        self.reconnected += 1
                except BaseException:
                    pooled.close()
                    raise
            db = self._new_reader()
            try:
                return self._read_on(db, fn, watchdog)
            except BaseException:
                db.close()
                raise
        except psycopg.Error as exc:
            if watchdog.fired:
                raise LedgerUnavailable(
                    f"PostgreSQL did not answer a read within {watchdog.limit:g} s"
                ) from exc
            raise

    async def _read(self, fn: Callable[[PgConnection], T]) -> T:
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        try:
            return await trio.to_thread.run_sync(
                self._run_read, fn, self._watchdogs.call(), limiter=self._read_limiter
            )
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"read failed: {' '.join(str(exc).split())}") from exc

    async def _submit(self, op: _Op[T]) -> T:
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

    async def _write(self, fn: Callable[[PgConnection], T]) -> T:
        return await self._submit(_Op(fn, None))

    # -- operations --

    async def create_account(
        self,
        name: str,
        password_hash: str | None,
        kind: AccountKind = "native",
        initial_deposit: int = 0,
    ) -> Account:
        if initial_deposit < 0 or initial_deposit > self.limits.max_deposit:
            raise AmountOutOfRange(f"initial deposit must be within 0..{self.limits.max_deposit}")

        def op(db: PgConnection) -> Account:
            now = _now_ms()
            # ON CONFLICT: a taken name must not abort the batch's transaction.
            row = db.execute(
                "INSERT INTO accounts(name, name_key, kind, password_hash, balance, created_ms)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING name",
                (name, name_key(name), kind, password_hash, initial_deposit, now),
            ).fetchone()
            if row is None:
                raise NameTaken(f"the name {name!r} is taken")
            if initial_deposit:
                db.execute(_INSERT_DEPOSIT, (name, initial_deposit, initial_deposit, now, None))
                db.execute(_ISSUE, (initial_deposit,))
            return Account(name, kind, password_hash, initial_deposit)

        return await self._write(op)

    async def account(self, name: str) -> Account | None:
        def op(db: PgConnection) -> Account | None:
            row = db.execute(
                "SELECT name, kind, password_hash, balance, peer_key, peer_key_expires_ms"
                " FROM accounts WHERE name_key = %s",
                (name_key(name),),
            ).fetchone()
            if row is None:
                return None
            registered, kind, password_hash, balance, key, expires = row
            peer_key = None if key is None else bytes(key)
            return Account(registered, kind, password_hash, balance, peer_key, expires)

        return await self._read(op)

    async def balance(self, name: str) -> int | None:
        """``name``'s balance (None: no such account). Always read: other nodes move money
        too, and nothing here would tell a cache."""

        def op(db: PgConnection) -> int | None:
            row = db.execute(
                "SELECT balance FROM accounts WHERE name_key = %s", (name_key(name),)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._read(op)

    async def set_peer_key(self, name: str, key_der: bytes | None, expires_ms: int | None) -> None:
        """Make ``key_der`` the account's current peer key; None revokes the current one."""

        def op(db: PgConnection) -> None:
            cur = db.execute(
                "UPDATE accounts SET peer_key = %s, peer_key_expires_ms = %s WHERE name_key = %s",
                (key_der, expires_ms, name_key(name)),
            )
            if cur.rowcount != 1:
                raise UnknownAccount(f"no account {name!r}")

        await self._write(op)

    async def transfer(self, payment_id: uuid.UUID) -> Transfer | None:
        """The settled transfer with this payment id, if any."""

        def op(db: PgConnection) -> Transfer | None:
            return _stored_transfer(db, payment_id)

        return await self._read(op)

    async def deposit(self, name: str, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        limits = self.limits
        if amount < 1 or amount > limits.max_deposit:
            raise AmountOutOfRange(f"a deposit must be within 1..{limits.max_deposit}")

        def done_before(db: PgConnection) -> int | None:
            """The first outcome of this deposit id, if it was used (or a conflict)."""
            done = db.execute(
                "SELECT payee, amount, payee_balance_after FROM movements WHERE deposit_id = %s",
                (deposit_id,),
            ).fetchone()
            if done is None:
                return None
            if name_key(done[0]) != name_key(name) or done[1] != amount:
                raise DepositIdConflict(
                    f"deposit {deposit_id} was already used for a different deposit"
                )
            return int(done[2])

        def op(db: PgConnection) -> int:
            row = db.execute(
                "SELECT name, balance, frozen FROM accounts WHERE name_key = %s FOR NO KEY UPDATE",
                (name_key(name),),
            ).fetchone()
            if row is None:
                raise UnknownAccount(f"no account {name!r}")
            if deposit_id is not None and (first := done_before(db)) is not None:
                return first  # the first outcome; nothing moves again
            registered, balance, frozen = row[0], row[1] + amount, row[2]
            if frozen:
                raise AccountFrozen(f"the account {registered!r} is frozen")
            if balance > limits.max_balance:
                raise BalanceLimit(f"the balance would exceed {limits.max_balance}")
            # The movement first: ON CONFLICT, another node took this deposit id meanwhile
            # (its transaction waited for), and nothing here has been written yet.
            inserted = db.execute(
                _INSERT_DEPOSIT + " ON CONFLICT (deposit_id) DO NOTHING RETURNING seq",
                (registered, amount, balance, _now_ms(), deposit_id),
            ).fetchone()
            if inserted is None:
                first = done_before(db)
                assert first is not None
                return first
            db.execute("UPDATE accounts SET balance = %s WHERE name = %s", (balance, registered))
            db.execute(_ISSUE, (amount,))
            return int(balance)

        return await self._write(op)

    async def change_password(self, name: str, password_hash: str) -> None:
        def op(db: PgConnection) -> None:
            cur = db.execute(
                "UPDATE accounts SET password_hash = %s WHERE name_key = %s AND kind = 'native'",
                (password_hash, name_key(name)),
            )
            if cur.rowcount != 1:
                raise UnknownAccount(f"no native account {name!r}")

        await self._write(op)

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        accepted_with: bytes | None = None,
        memo: str | None = None,
    ) -> Transfer:
        """Move ``amount`` from ``payer`` to ``payee`` once per ``payment_id``, on every node
        sharing the database; see :meth:`.SqliteLedger.settle` for ``accepted_with``."""
        started, outcome = time.perf_counter(), "cancelled"
        try:
            transfer: Transfer = await self._submit(
                _Op(None, _Settle(payment_id, payer, payee, amount, accepted_with, memo))
            )
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
        def op(db: PgConnection) -> list[Entry]:
            find = "SELECT name FROM accounts WHERE name_key = %s"
            found = db.execute(find, (name_key(name),)).fetchone()
            if found is None:
                return []
            registered = found[0]
            other: str | None = None
            if counterparty is not None:
                row = db.execute(find, (name_key(counterparty),)).fetchone()
                if row is None:
                    return []
                other = row[0]
            params = history_params(registered, other, limit, before, since_ms, until_ms)
            return history_entries(db.execute(_HISTORY, params).fetchall(), registered)

        return await self._read(op)

    async def audit(self) -> Audit:
        def op(db: PgConnection) -> Audit:
            row = db.execute(
                "SELECT COALESCE(SUM(balance), 0), MIN(balance), COUNT(*) FROM accounts"
            ).fetchone()
            assert row is not None
            total, low, count = row
            row = db.execute(
                "SELECT COALESCE(SUM(CASE WHEN payer IS NULL THEN amount END), 0),"
                " COALESCE(SUM(CASE WHEN payee IS NULL THEN amount END), 0),"
                " COUNT(payment_id) FROM movements"
            ).fetchone()
            assert row is not None
            issued, withdrawn, transfers = row
            row = db.execute("SELECT balance FROM issuance WHERE id = 1").fetchone()
            assert row is not None
            # SUM of BIGINT is NUMERIC in PostgreSQL: whole numbers, made ints here.
            return Audit(
                int(total),
                int(issued),
                None if low is None else int(low),
                int(count),
                int(transfers),
                int(withdrawn),
                int(row[0]),
            )

        return await self._read(op)

    async def invalid_names(self) -> list[str]:
        """Accounts whose names the name rule (p2ppay.names) refuses (made by other means)."""

        def op(db: PgConnection) -> list[str]:
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

        def op(db: PgConnection) -> PaymentRequest:
            # Both accounts locked (in name_key order, as settles do): two nodes counting one
            # account's open requests at once cannot both pass the limit.
            found = {
                key: registered
                for key, registered in db.execute(
                    "SELECT name_key, name FROM accounts WHERE name_key IN (%s, %s)"
                    " AND kind = 'native' ORDER BY name_key FOR NO KEY UPDATE",
                    (name_key(requester), name_key(payer)),
                ).fetchall()
            }
            # (Refused only after a statement: the writer takes a batch in which none ran
            # for a failed transaction.)
            if name_key(requester) == name_key(payer):
                raise SelfPayment("you cannot ask yourself to pay you")
            me, them = found.get(name_key(requester)), found.get(name_key(payer))
            if me is None:
                raise UnknownAccount(f"no account {requester!r}")
            if them is None:
                raise UnknownAccount(f"no account named {payer!r}")
            now = _now_ms()
            row = db.execute(
                "SELECT COUNT(*) FROM payment_requests"
                " WHERE requester = %s AND state = 'open' AND expires_ms > %s",
                (me, now),
            ).fetchone()
            assert row is not None
            if row[0] >= max_open:
                raise TooManyRequests(f"you have {row[0]} open requests already")
            # Counted per requester, not in all: otherwise anyone could fill the payer's
            # quota and so stop everyone else from asking it for money.
            row = db.execute(
                "SELECT COUNT(*) FROM payment_requests WHERE payer = %s AND requester = %s"
                " AND state = 'open' AND expires_ms > %s",
                (them, me, now),
            ).fetchone()
            assert row is not None
            if row[0] >= max_per_payer:
                raise TooManyRequests(f"{them} has {row[0]} open requests of yours already")
            db.execute(
                "INSERT INTO payment_requests(id, requester, payer, amount, memo,"
                " created_ms, expires_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (request_id, me, them, amount, memo, now, expires_ms),
            )
            return PaymentRequest(request_id, me, them, amount, memo, now, expires_ms, "open")

        return await self._write(op)

    async def open_requests(self, name: str, limit: int) -> OpenRequests:
        def op(db: PgConnection) -> OpenRequests:
            found = db.execute(
                "SELECT name FROM accounts WHERE name_key = %s", (name_key(name),)
            ).fetchone()
            if found is None:
                return OpenRequests([], [], 0, 0)
            now = _now_ms()
            me = found[0]
            lists, totals = [], []
            for column, order in (("payer", INCOMING_REQUEST_ORDER), ("requester", "")):
                rows = db.execute(
                    f"SELECT {REQUEST_COLUMNS} FROM payment_requests AS r"
                    f" WHERE {column} = %s AND state = 'open' AND expires_ms > %s"
                    f" ORDER BY {order}created_ms DESC, id LIMIT %s",
                    (me, now, limit),
                ).fetchall()
                lists.append([_request(row, now) for row in rows])
                row = db.execute(
                    f"SELECT COUNT(*) FROM payment_requests"
                    f" WHERE {column} = %s AND state = 'open' AND expires_ms > %s",
                    (me, now),
                ).fetchone()
                assert row is not None
                totals.append(int(row[0]))
            return OpenRequests(lists[0], lists[1], totals[0], totals[1])

        return await self._read(op)

    async def purge_requests(self, closed_before_ms: int, limit: int) -> int:
        def op(db: PgConnection) -> int:
            deleted = 0
            for where in _PURGEABLE:
                cursor = db.execute(
                    "DELETE FROM payment_requests WHERE id IN"
                    f" (SELECT id FROM payment_requests WHERE {where} LIMIT %s)",
                    (closed_before_ms, limit - deleted),
                )
                deleted += cursor.rowcount
            return deleted

        return await self._write(op)

    async def pay_request(
        self, request_id: uuid.UUID, payer: str
    ) -> tuple[Transfer, PaymentRequest]:
        limits = self.limits

        def op(db: PgConnection) -> tuple[Transfer, PaymentRequest]:
            # Locked: a node paying, declining or cancelling it at the same moment waits.
            row = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE id = %s FOR UPDATE",
                (request_id,),
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
            # The money moves by the settle function, as every transfer does (no key to
            # check: the requester's consent is the request itself).
            settle = _Settle(
                request_id, request.payer, request.requester, request.amount, None, request.memo
            )
            outcome = db.execute(
                "SELECT * FROM p2ppay_settle_batch(%s, %s, %s, %s)",
                (Jsonb([settle.as_json()]), limits.max_payment, limits.max_balance, now),
            ).fetchone()
            assert outcome is not None
            transfer = settle.outcome(outcome, limits)
            if isinstance(transfer, LedgerError):
                raise transfer
            if transfer.replayed:
                raise PaymentIdConflict(f"payment {request_id} was already used")
            db.execute(
                "UPDATE payment_requests SET state = 'paid', closed_ms = %s, told = FALSE"
                " WHERE id = %s",
                (transfer.at_ms, request_id),
            )
            return transfer, dataclasses.replace(request, state="paid", closed_ms=transfer.at_ms)

        return await self._write(op)

    async def close_request(
        self, request_id: uuid.UUID, name: str, state: Literal["declined", "cancelled"]
    ) -> PaymentRequest:
        def op(db: PgConnection) -> PaymentRequest:
            row = db.execute(
                f"SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE id = %s FOR UPDATE",
                (request_id,),
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
                "UPDATE payment_requests SET state = %s, closed_ms = %s, told = %s WHERE id = %s",
                (state, now, state != "declined", request_id),
            )
            return dataclasses.replace(request, state=state, closed_ms=now)

        return await self._write(op)

    async def request_news(self, name: str) -> list[PaymentRequest]:
        def op(db: PgConnection) -> list[PaymentRequest]:
            now = _now_ms()
            rows = db.execute(
                f"UPDATE payment_requests SET told = TRUE"
                f" WHERE told = FALSE AND requester ="
                f" (SELECT name FROM accounts WHERE name_key = %s)"
                f" RETURNING {REQUEST_COLUMNS}",
                (name_key(name),),
            ).fetchall()
            news = [_request(row, now) for row in rows]
            return sorted(news, key=lambda r: (r.closed_ms or 0, str(r.request_id)))

        def any_news(db: PgConnection) -> bool:
            row = db.execute(
                "SELECT 1 FROM payment_requests WHERE NOT told AND requester ="
                " (SELECT name FROM accounts WHERE name_key = %s) LIMIT 1",
                (name_key(name),),
            ).fetchone()
            return row is not None

        # Most logins have no news: a read beside the writer, not a place in its queue.
        if not await self._read(any_news):
            return []
        return await self._write(op)

    async def told(self, request_id: uuid.UUID) -> None:
        def op(db: PgConnection) -> None:
            db.execute("UPDATE payment_requests SET told = TRUE WHERE id = %s", (request_id,))

        await self._write(op)

    async def record_login(self, name: str) -> None:
        """Remember when ``name`` last logged in (for the operator's account list)."""

        def op(db: PgConnection) -> None:
            db.execute(
                "UPDATE accounts SET last_login_ms = %s WHERE name_key = %s",
                (_now_ms(), name_key(name)),
            )

        await self._write(op)


@asynccontextmanager
async def open_postgres_ledger(
    url: str,
    limits: Limits | None = None,
    *,
    max_batch: int = 512,
    readers: int = 2,
    timeouts: PgTimeouts | None = None,
) -> AsyncIterator[PostgresLedger]:
    """Open the ledger in the PostgreSQL database at ``url`` (creating its tables if need be);
    on exit, drain queued work and close. An unreachable server, or a database from a newer
    p2ppay, is :class:`LedgerUnavailable` (one line, no password)."""
    ledger = PostgresLedger(url, limits or Limits(), max_batch, readers=readers, timeouts=timeouts)
    # Connected (and migrated) before the nursery: a failure is one plain exception.
    await trio.to_thread.run_sync(ledger._open_blocking, limiter=ledger._limiter)
    try:
        async with trio.open_nursery() as watching:
            await watching.start(ledger._watchdogs.run)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(ledger._writer)
                    try:
                        yield ledger
                    finally:
                        # Closing the channel lets the writer finish what is queued, then stop.
                        ledger._send.close()
            finally:
                ledger._watchdogs.stop()  # (once the writer, its last call, has returned)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ledger._close_blocking, limiter=ledger._limiter)


__all__ = ["RETRIES", "SETTLED_CHANNEL", "PostgresLedger", "describe", "open_postgres_ledger"]
