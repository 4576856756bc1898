"""Where money moves: accounts, deposits and exactly-once transfers in a durable SQLite ledger.

Every call is an *operation* handed to one writer task. The writer takes all operations waiting
at that moment (up to ``max_batch``), runs them in one transaction on its dedicated connection in
a worker thread, commits with ``synchronous=FULL`` and only then answers each caller (group
commit). An operation refuses (insufficient funds, say) only before it writes anything, so a
refusal leaves the batch intact; any other failure, and a failed commit, roll the whole batch
back and every caller in it gets :class:`LedgerUnavailable`: nothing of it is acknowledged.

The ledger knows nothing of connections or the wire protocol; :class:`Ledger` is the narrow
interface the server uses, so another backend can stand in without touching the server.
"""

from __future__ import annotations

import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import trio

from .constraints import MAX_AMOUNT, is_amount
from .names import name_key
from .settings import count, setting

T = TypeVar("T")

AccountKind = Literal["native", "course"]
#: Checks a new payment's authorisation; returns None if it holds, else the reason it does not.
Authorize = Callable[[], "str | None"]


# --- errors: each one means "nothing happened" -----------------------------------------------


class LedgerError(Exception):
    """An operation was refused; the ledger is unchanged by it."""


class NameTaken(LedgerError):
    pass


class UnknownAccount(LedgerError):
    pass


class UnknownPayee(LedgerError):
    pass


class AmountOutOfRange(LedgerError):
    pass


class BalanceLimit(LedgerError):
    pass


class InsufficientFunds(LedgerError):
    pass


class SelfPayment(LedgerError):
    pass


class PaymentIdConflict(LedgerError):
    """The payment id was used before for a different payer, payee or amount."""


class Unauthorized(LedgerError):
    """The payment's authorisation (the payee's signed acceptance) did not check out."""


class LedgerUnavailable(LedgerError):
    """The batch could not be committed (disk full, I/O error, shutting down)."""


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The ledger's money limits; each field is also the server's command-line flag."""

    max_deposit: int = setting(1_000_000, "--max-deposit", "largest single deposit", count)
    max_payment: int = setting(1_000_000, "--max-payment", "largest single payment", count)
    max_balance: int = setting(1_000_000_000, "--max-balance", "no balance may exceed this", count)

    def __post_init__(self) -> None:
        for name in ("max_deposit", "max_payment", "max_balance"):
            value = getattr(self, name)
            if not is_amount(value):
                raise ValueError(f"{name} must be a whole number in 1..{MAX_AMOUNT}")


@dataclass(frozen=True, slots=True)
class Account:
    name: str  # as registered; looked up by its canonical form (p2ppay.names.name_key)
    kind: AccountKind
    password_hash: str | None
    balance: int
    peer_key: bytes | None = None
    peer_key_expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    payment_id: uuid.UUID
    payer: str
    payee: str
    amount: int
    payer_balance: int  # right after the transfer
    payee_balance: int  # right after the transfer
    at_ms: int
    replayed: bool = False  # True when this is the stored outcome of an earlier settle


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Literal["deposit", "sent", "received"]
    amount: int
    balance: int
    at_ms: int
    counterparty: str | None
    payment_id: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Audit:
    total_balances: int
    total_deposits: int
    min_balance: int | None
    accounts: int
    transfers: int

    @property
    def conserved(self) -> bool:
        return self.total_balances == self.total_deposits and (
            self.min_balance is None or self.min_balance >= 0
        )


class Ledger(Protocol):
    """What the server needs from a ledger, and all of it."""

    limits: Limits

    async def create_account(
        self,
        name: str,
        password_hash: str | None,
        kind: AccountKind = "native",
        initial_deposit: int = 0,
    ) -> Account: ...

    async def account(self, name: str) -> Account | None: ...

    async def set_peer_key(
        self, name: str, key_der: bytes | None, expires_ms: int | None
    ) -> None: ...

    async def deposit(self, name: str, amount: int) -> int: ...

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        authorize: Authorize | None = None,
    ) -> Transfer: ...

    async def history(self, name: str, limit: int) -> list[Entry]: ...

    async def audit(self) -> Audit: ...


# --- SQLite ----------------------------------------------------------------------------------

# Accounts are looked up by ``name_key``, the canonical form of the name (p2ppay.names), and
# shown by ``name``, as registered. Movements name accounts as registered.
SCHEMA_VERSION = 2

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS accounts (
    name          TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('native', 'course')),
    password_hash TEXT,
    balance       INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_ms    INTEGER NOT NULL,
    -- the public key certified for the account's current session (DER), and until when:
    -- acceptances are checked against it, so a replaced session's key stops counting
    peer_key      BLOB,
    peer_key_expires_ms INTEGER
);
-- names are unique regardless of case, so nobody can pose as "Alice" beside "alice"
CREATE UNIQUE INDEX IF NOT EXISTS accounts_name_nocase ON accounts(name COLLATE NOCASE);
-- Every movement of money is one row, in one sequence: a deposit brings money in from outside
-- (no payer), a transfer moves it between two accounts and is keyed by its payment id.
CREATE TABLE IF NOT EXISTS movements (
    seq                 INTEGER PRIMARY KEY,
    kind                TEXT NOT NULL CHECK (kind IN ('deposit', 'transfer')),
    payment_id          TEXT UNIQUE,
    payer               TEXT REFERENCES accounts(name),
    payee               TEXT NOT NULL REFERENCES accounts(name),
    amount              INTEGER NOT NULL CHECK (amount > 0),
    payer_balance_after INTEGER CHECK (payer_balance_after >= 0),
    payee_balance_after INTEGER NOT NULL CHECK (payee_balance_after >= 0),
    at_ms               INTEGER NOT NULL,
    CHECK ((kind = 'deposit' AND payer IS NULL AND payment_id IS NULL
            AND payer_balance_after IS NULL)
        OR (kind = 'transfer' AND payer IS NOT NULL AND payment_id IS NOT NULL
            AND payer_balance_after IS NOT NULL AND payer <> payee))
);
CREATE INDEX IF NOT EXISTS movements_payer ON movements(payer, seq);
CREATE INDEX IF NOT EXISTS movements_payee ON movements(payee, seq);
"""

# Version 2: one canonical form of a name, computed by p2ppay.names.name_key (registered as an
# SQL function for this), replaces SQLite's own NOCASE folding. Existing names keep their
# spelling; their keys cannot collide, as NOCASE kept them unique under the same folding.
_SCHEMA_V2 = """
-- (SQLite can add a NOT NULL column only with a default; create_account always sets it)
ALTER TABLE accounts ADD COLUMN name_key TEXT NOT NULL DEFAULT '';
UPDATE accounts SET name_key = p2ppay_name_key(name);
CREATE UNIQUE INDEX accounts_name_key ON accounts(name_key);
DROP INDEX IF EXISTS accounts_name_nocase;
"""

#: version -> the script that brings a ledger from the version before to it
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}


_INSERT_DEPOSIT = (
    "INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms)"
    " VALUES ('deposit', ?, ?, ?, ?)"
)


_COLUMNS = (
    "seq, kind, payer, payee, amount, payer_balance_after, payee_balance_after, at_ms, payment_id"
)
_HISTORY = (
    f"SELECT * FROM (SELECT {_COLUMNS} FROM movements WHERE payer = :name"
    f" ORDER BY seq DESC LIMIT :limit)"
    f" UNION ALL"
    f" SELECT * FROM (SELECT {_COLUMNS} FROM movements WHERE payee = :name"
    f" ORDER BY seq DESC LIMIT :limit)"
    f" ORDER BY seq DESC LIMIT :limit"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "result", "write")

    def __init__(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> None:
        self.fn = fn
        self.write = write
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SqliteLedger:
    """The SQLite backend. Use :func:`open_sqlite_ledger`, which owns its writer task."""

    def __init__(self, path: Path | str, limits: Limits, max_batch: int = 512) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.path = str(path)
        self.limits = limits
        self.max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Op[Any]](math.inf)
        # One dedicated connection, used by one thread at a time.
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        # Figures for the benchmark: how well group commit is doing.
        self.commits = 0
        self.ops_committed = 0

    # -- lifecycle --

    def _open_blocking(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.close()
            raise LedgerUnavailable(
                f"{self.path} has schema version {version}; this p2ppay knows {SCHEMA_VERSION}"
            )
        db.create_function("p2ppay_name_key", 1, name_key, deterministic=True)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # Each step in one transaction, its version number included: all of it or none.
            try:
                db.executescript(
                    f"BEGIN IMMEDIATE; {_MIGRATIONS[target]}; PRAGMA user_version={target}; COMMIT;"
                )
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.rollback()
                db.close()
                raise LedgerUnavailable(
                    f"{self.path}: cannot upgrade the schema to version {target}: {exc}"
                ) from exc
        self._db = db

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
                    for op in batch:
                        op.done.set()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_blocking, limiter=self._limiter)

    def _close_blocking(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _run_batch(self, batch: list[_Op[Any]]) -> None:
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in batch:
                try:
                    op.result = op.fn(db)
                except LedgerError as exc:
                    # Every operation checks before it writes, so a refusal has written
                    # nothing: no savepoint to roll back to (that saves two statements an op).
                    op.error = exc
            db.execute("COMMIT")
        except BaseException as exc:
            # Anything else (an I/O error, a constraint that should have been impossible)
            # may have left a half-done operation: none of the batch is kept or acknowledged.
            if db.in_transaction:
                db.rollback()
            for op in batch:
                op.result = None
                op.error = LedgerUnavailable(f"commit failed: {exc}")
            if not isinstance(exc, Exception):
                raise
            return
        self.commits += 1
        self.ops_committed += len(batch)

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        op: _Op[T] = _Op(fn, write)
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
                db.execute(_INSERT_DEPOSIT, (name, initial_deposit, initial_deposit, now))
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

        return await self._submit(op, write=False)

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
            row = db.execute(
                "SELECT payer, payee, amount, payer_balance_after, payee_balance_after, at_ms"
                " FROM movements WHERE payment_id = ?",
                (str(payment_id),),
            ).fetchone()
            if row is None:
                return None
            payer, payee, amount, payer_after, payee_after, at_ms = row
            return Transfer(
                payment_id, payer, payee, amount, payer_after, payee_after, at_ms, replayed=True
            )

        return await self._submit(op, write=False)

    async def deposit(self, name: str, amount: int) -> int:
        limits = self.limits
        if amount < 1 or amount > limits.max_deposit:
            raise AmountOutOfRange(f"a deposit must be within 1..{limits.max_deposit}")

        def op(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT name, balance FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if row is None:
                raise UnknownAccount(f"no account {name!r}")
            registered, balance = row[0], row[1] + amount
            if balance > limits.max_balance:
                raise BalanceLimit(f"the balance would exceed {limits.max_balance}")
            db.execute("UPDATE accounts SET balance = ? WHERE name = ?", (balance, registered))
            db.execute(_INSERT_DEPOSIT, (registered, amount, balance, _now_ms()))
            return int(balance)

        return await self._submit(op)

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        authorize: Authorize | None = None,
    ) -> Transfer:
        """Move ``amount`` from ``payer`` to ``payee`` once per ``payment_id``.

        ``authorize`` is called (in the writer's thread, so it may be CPU work that releases
        the GIL, like checking a signature) only for a payment not settled before, once the
        accounts are known to exist: it returns None to go ahead, or why not
        (:class:`Unauthorized`). A retry of a settled payment gets its stored outcome without
        being authorised again."""
        limits = self.limits
        pid = str(payment_id)
        payer_key, payee_key = name_key(payer), name_key(payee)

        def op(db: sqlite3.Connection) -> Transfer:
            row = db.execute(
                "SELECT payer, payee, amount, payer_balance_after, payee_balance_after, at_ms"
                " FROM movements WHERE payment_id = ?",
                (pid,),
            ).fetchone()
            if row is not None:
                if (name_key(row[0]), name_key(row[1]), row[2]) != (payer_key, payee_key, amount):
                    raise PaymentIdConflict(
                        f"payment {pid} was already used for a different payment"
                    )
                return Transfer(payment_id, row[0], row[1], amount, row[3], row[4], row[5], True)
            if payer_key == payee_key:
                raise SelfPayment("you cannot pay yourself")
            if amount < 1 or amount > limits.max_payment:
                raise AmountOutOfRange(f"a payment must be within 1..{limits.max_payment}")
            found = {
                key: (balance, kind, registered)
                for key, balance, kind, registered in db.execute(
                    "SELECT name_key, balance, kind, name FROM accounts WHERE name_key IN (?, ?)",
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
            if authorize is not None and (refusal := authorize()) is not None:
                raise Unauthorized(refusal)
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
                " payer_balance_after, payee_balance_after, at_ms)"
                " VALUES ('transfer', ?, ?, ?, ?, ?, ?, ?)",
                (pid, src_name, dst_name, amount, payer_after, payee_after, now),
            )
            return Transfer(payment_id, src_name, dst_name, amount, payer_after, payee_after, now)

        return await self._submit(op)

    async def history(self, name: str, limit: int) -> list[Entry]:
        def op(db: sqlite3.Connection) -> list[Entry]:
            found = db.execute(
                "SELECT name FROM accounts WHERE name_key = ?", (name_key(name),)
            ).fetchone()
            if found is None:
                return []
            registered = found[0]
            # Newest first from each side's index, then merged: reads about 2 x limit rows
            # however long the account's history is (an OR would sort all of it).
            rows = db.execute(_HISTORY, {"name": registered, "limit": limit}).fetchall()
            entries = []
            for _seq, kind, payer, payee, amount, payer_after, payee_after, at, pid in rows:
                if kind == "deposit":
                    entries.append(Entry("deposit", amount, payee_after, at, None, None))
                elif payer == registered:
                    entries.append(Entry("sent", amount, payer_after, at, payee, uuid.UUID(pid)))
                else:
                    entries.append(
                        Entry("received", amount, payee_after, at, payer, uuid.UUID(pid))
                    )
            return entries

        return await self._submit(op, write=False)

    async def audit(self) -> Audit:
        def op(db: sqlite3.Connection) -> Audit:
            total, low, count = db.execute(
                "SELECT COALESCE(SUM(balance), 0), MIN(balance), COUNT(*) FROM accounts"
            ).fetchone()
            deposited, transfers = db.execute(
                "SELECT COALESCE(SUM(CASE kind WHEN 'deposit' THEN amount END), 0),"
                " COUNT(payment_id) FROM movements"
            ).fetchone()
            return Audit(total, deposited, low, count, transfers)

        return await self._submit(op, write=False)


@asynccontextmanager
async def open_sqlite_ledger(
    path: Path | str, limits: Limits | None = None, *, max_batch: int = 512
) -> AsyncIterator[SqliteLedger]:
    """Open (creating if needed) the ledger at ``path``; on exit, drain queued work and close."""
    ledger = SqliteLedger(path, limits or Limits(), max_batch)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger._writer)
        try:
            yield ledger
        finally:
            # Closing the channel lets the writer finish what is queued, then stop.
            ledger._send.close()
