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
import os
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
from .names import is_valid_name, name_key
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


class AccountFrozen(LedgerError):
    """The operator froze the payer's or the payee's account: it can neither pay nor be paid."""


class ReferenceConflict(LedgerError):
    """An operator's reference was used before for a different credit or debit."""


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
    #: money issued: every deposit and operator credit, by the movements table
    total_deposits: int
    min_balance: int | None
    accounts: int
    transfers: int
    #: money taken out by the operator's debits, by the movements table
    withdrawn: int
    #: the issuance account's own balance: minus what is issued and not withdrawn
    issuance_balance: int

    @property
    def conserved(self) -> bool:
        """Double entry holds: the balances add up to what was issued less what was withdrawn,
        and so does the issuance account on its own; no balance is negative."""
        outstanding = self.total_deposits - self.withdrawn
        return self.total_balances == outstanding == -self.issuance_balance and (
            self.min_balance is None or self.min_balance >= 0
        )


class LedgerObserver(Protocol):
    """Told how the ledger is doing (the server's metrics); called from the writer's thread."""

    def committed(self, operations: int, seconds: float) -> None: ...

    def settled(self, outcome: str, seconds: float) -> None:
        """``outcome``: ``ok``, ``replayed``, or the refusal's class name."""


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

    async def record_login(self, name: str) -> None: ...


# --- SQLite ----------------------------------------------------------------------------------

# Accounts are looked up by ``name_key``, the canonical form of the name (p2ppay.names), and
# shown by ``name``, as registered. Movements name accounts as registered.
SCHEMA_VERSION = 3

# The schema as version 1 made it. A new ledger is made at version 1 and then migrated step by
# step like any old one, so every open exercises the migrations the ledgers on disk need.
SCHEMA_V1 = """
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
_TO_V2 = (
    # (SQLite can add a NOT NULL column only with a default; create_account always sets it)
    "ALTER TABLE accounts ADD COLUMN name_key TEXT NOT NULL DEFAULT ''",
    "UPDATE accounts SET name_key = p2ppay_name_key(name)",
    "CREATE UNIQUE INDEX accounts_name_key ON accounts(name_key)",
    "DROP INDEX IF EXISTS accounts_name_nocase",
)

# Version 3: the operator. Money comes from (and goes back to) an issuance account, so every
# movement is double entry: a deposit or an operator's credit moves money from the issuance
# account (payer NULL) to an account, an operator's debit from an account back to it (payee
# NULL). The issuance account's balance is minus everything issued and not withdrawn, so all
# balances, its own included, add up to zero. Accounts can be frozen and remember the last
# login. movements is rebuilt (SQLite cannot change a CHECK in place), keeping every row.
_TO_V3 = (
    "ALTER TABLE accounts ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0 CHECK (frozen IN (0, 1))",
    "ALTER TABLE accounts ADD COLUMN last_login_ms INTEGER",
    """CREATE TABLE issuance (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        balance INTEGER NOT NULL CHECK (balance <= 0)
    )""",
    """INSERT INTO issuance(id, balance)
        SELECT 1, -COALESCE(SUM(amount), 0) FROM movements WHERE kind = 'deposit'""",
    """CREATE TABLE movements_v2 (
        seq                 INTEGER PRIMARY KEY,
        kind                TEXT NOT NULL
                            CHECK (kind IN ('deposit', 'credit', 'debit', 'transfer')),
        payment_id          TEXT UNIQUE,
        -- the operator's reference of a credit or debit: one reference moves money once
        reference           TEXT UNIQUE,
        payer               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        payee               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        amount              INTEGER NOT NULL CHECK (amount > 0),
        payer_balance_after INTEGER CHECK (payer_balance_after >= 0),
        payee_balance_after INTEGER CHECK (payee_balance_after >= 0),
        at_ms               INTEGER NOT NULL,
        CHECK ((payer IS NULL) = (payer_balance_after IS NULL)
            AND (payee IS NULL) = (payee_balance_after IS NULL)),
        CHECK ((kind = 'deposit' AND payer IS NULL AND payee IS NOT NULL
                AND payment_id IS NULL AND reference IS NULL)
            OR (kind = 'credit' AND payer IS NULL AND payee IS NOT NULL
                AND payment_id IS NULL AND reference IS NOT NULL)
            OR (kind = 'debit' AND payer IS NOT NULL AND payee IS NULL
                AND payment_id IS NULL AND reference IS NOT NULL)
            OR (kind = 'transfer' AND payer IS NOT NULL AND payee IS NOT NULL
                AND payment_id IS NOT NULL AND reference IS NULL AND payer <> payee))
    )""",
    """INSERT INTO movements_v2(seq, kind, payment_id, payer, payee, amount,
            payer_balance_after, payee_balance_after, at_ms)
        SELECT seq, kind, payment_id, payer, payee, amount,
            payer_balance_after, payee_balance_after, at_ms FROM movements""",
    "DROP TABLE movements",
    "ALTER TABLE movements_v2 RENAME TO movements",
    "CREATE INDEX movements_payer ON movements(payer, seq)",
    "CREATE INDEX movements_payee ON movements(payee, seq)",
)

#: The statements that take a ledger from version N to N + 1, by N (0: a new file).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: tuple(stmt for stmt in SCHEMA_V1.split(";") if stmt.strip()),
    1: _TO_V2,
    2: _TO_V3,
}
assert sorted(_MIGRATIONS) == list(range(SCHEMA_VERSION))


def connect_sqlite(path: Path | str, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection to the ledger at ``path`` (created if need be) at :data:`SCHEMA_VERSION`:
    WAL, ``synchronous=FULL``, foreign keys on, autocommit (callers BEGIN themselves).

    Migrating runs in one write transaction, so the server and an admin command opening the
    same old file at once migrate it once. A file from a newer p2ppay is refused."""
    if str(path) != ":memory:" and not os.path.exists(path):
        # It holds password hashes and everyone's movements: readable by its owner only.
        # (SQLite gives the -wal and -shm files the same permissions.)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.create_function("p2ppay_name_key", 1, name_key, deterministic=True)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return db  # nothing to migrate: no need to wait for the write lock
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerUnavailable(
                    f"{path} has schema version {version}; this p2ppay knows {SCHEMA_VERSION}"
                )
            for step in range(version, SCHEMA_VERSION):
                try:
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                except sqlite3.Error as exc:
                    raise LedgerUnavailable(
                        f"{path}: cannot upgrade the schema to version {step + 1}: {exc}"
                    ) from exc
            if version < SCHEMA_VERSION:
                if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise LedgerUnavailable(f"{path}: a movement names a missing account")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
    except BaseException:
        db.close()
        raise
    return db


_INSERT_DEPOSIT = (
    "INSERT INTO movements(kind, payee, amount, payee_balance_after, at_ms)"
    " VALUES ('deposit', ?, ?, ?, ?)"
)
#: the other half of a deposit: the money comes out of the issuance account
_ISSUE = "UPDATE issuance SET balance = balance - ? WHERE id = 1"


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
        self.observer: LedgerObserver | None = None

    # -- lifecycle --

    def _open_blocking(self) -> None:
        self._db = connect_sqlite(self.path)

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
        started = time.perf_counter()
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
        if self.observer is not None:
            self.observer.committed(len(batch), time.perf_counter() - started)

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
            db.execute(_INSERT_DEPOSIT, (registered, amount, balance, _now_ms()))
            db.execute(_ISSUE, (amount,))
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
            # frozen and the payee's key are read here, inside the transaction, not from a
            # cache: an operator's freeze or password reset (another process, through this
            # file) holds from the next batch on.
            found = {
                key: (balance, kind, registered, frozen, revoked)
                for key, balance, kind, registered, frozen, revoked in db.execute(
                    "SELECT name_key, balance, kind, name, frozen, peer_key IS NULL"
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
            if authorize is not None and dst[4]:
                # The payee's key was revoked (an operator's password reset) since the server
                # cached it: its acceptances stop counting at once.
                raise Unauthorized(f"{dst_name} has no current peer key")
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
                if kind in ("deposit", "credit"):  # an operator's credit reads as a deposit
                    entries.append(Entry("deposit", amount, payee_after, at, None, None))
                elif kind == "debit":  # and a debit as money sent to nobody in particular
                    entries.append(Entry("sent", amount, payer_after, at, None, None))
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
            issued, withdrawn, transfers = db.execute(
                "SELECT COALESCE(SUM(CASE WHEN payer IS NULL THEN amount END), 0),"
                " COALESCE(SUM(CASE WHEN payee IS NULL THEN amount END), 0),"
                " COUNT(payment_id) FROM movements"
            ).fetchone()
            (issuance,) = db.execute("SELECT balance FROM issuance WHERE id = 1").fetchone()
            return Audit(total, issued, low, count, transfers, withdrawn, issuance)

        return await self._submit(op, write=False)

    async def invalid_names(self) -> list[str]:
        """Accounts whose names the name rule (p2ppay.names) refuses: made by an older p2ppay
        whose rule was looser, they cannot log in."""

        def op(db: sqlite3.Connection) -> list[str]:
            names = (row[0] for row in db.execute("SELECT name FROM accounts ORDER BY name"))
            return [name for name in names if not is_valid_name(name)]

        return await self._submit(op, write=False)

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
