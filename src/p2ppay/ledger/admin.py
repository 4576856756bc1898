"""The operator's view of a ledger: list, credit, debit, freeze, reset, audit, back up, export.

This runs in the ``p2ppay admin`` process, beside a running server, through the ledger file:
SQLite in WAL mode lets a second process read while the server writes, and take the write lock
between the server's batches. Every change is one short ``BEGIN IMMEDIATE`` transaction, so the
running server sees it from its next batch on; the server reads what matters (frozen, the
payee's key) inside its settle transaction, never from a cache. Waiting for the write lock is
bounded by :data:`BUSY_TIMEOUT_MS`.

:class:`LedgerAdmin` is what the ``admin`` command needs from a backend; :class:`SqliteAdmin` is
the SQLite one (a PostgreSQL one slots in beside it). It is plain blocking code: the admin
command is a short-lived process with nothing else to do meanwhile.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, final

from p2ppay.ledger.interface import (
    AccountKind,
    AmountOutOfRange,
    BalanceLimit,
    InsufficientFunds,
    LedgerError,
    LedgerUnavailable,
    ReferenceConflict,
    UnknownAccount,
)
from p2ppay.ledger.pgschema import redact
from p2ppay.ledger.schema import connect_sqlite
from p2ppay.wire.constraints import MAX_AMOUNT
from p2ppay.wire.names import name_key

#: how long an admin command waits for the server to let go of the write lock (a batch is
#: milliseconds; a checkpoint or a big batch on a slow disk may take longer)
BUSY_TIMEOUT_MS: Final = 10_000
#: no balance may pass this, whatever the server's --max-balance (which bounds only users)
MAX_BALANCE: Final = MAX_AMOUNT

AdjustmentKind = Literal["credit", "debit"]


class NotNative(LedgerError):
    """The account is a course account: it has no password."""


@dataclass(frozen=True, slots=True)
class AccountRow:
    name: str
    kind: AccountKind
    balance: int
    frozen: bool
    created_ms: int
    last_login_ms: int | None


@dataclass(frozen=True, slots=True)
class Adjustment:
    """An operator's credit or debit, as stored under its reference."""

    reference: str
    kind: AdjustmentKind
    name: str
    amount: int
    balance: int  # the account's balance right after it
    at_ms: int
    replayed: bool  # True: the reference was used before; this is that first outcome


@dataclass(frozen=True, slots=True)
class Movement:
    """One row of the journal. ``payer``/``payee`` None: the issuance account."""

    seq: int
    at_ms: int
    kind: str
    payer: str | None
    payee: str | None
    amount: int
    payer_balance_after: int | None
    payee_balance_after: int | None
    payment_id: str | None
    reference: str | None


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


class LedgerAdmin(Protocol):
    """What ``p2ppay admin`` needs from a ledger backend."""

    def accounts(self) -> list[AccountRow]: ...

    def adjust(self, kind: AdjustmentKind, name: str, amount: int, reference: str) -> Adjustment:
        """Credit or debit ``name`` once per ``reference`` (a repeat reports the first)."""

    def set_frozen(self, name: str, frozen: bool) -> AccountRow: ...

    def reset_password(self, name: str, password_hash: str) -> None:
        """Set a native account's password and revoke its sessions' peer keys."""

    def audit(self) -> AuditReport: ...

    def backup(self, dest: Path) -> None:
        """A consistent copy of the whole ledger at ``dest`` (which must not exist)."""

    def movements(self) -> Iterator[Movement]: ...

    def close(self) -> None: ...


def new_reference() -> str:
    return str(uuid.uuid4())


def _now_ms() -> int:
    return int(time.time() * 1000)


#: most offending rows an audit check names
_SHOWN: Final = 10


Rows = Callable[[str, tuple[object, ...]], list[Any]]


def book_checks(rows: Rows, placeholder: str) -> Iterator[Check]:
    """The checks of the books every backend makes (conservation, no negative balance, each
    balance against its movements, each payment id once), through ``rows(sql, args)`` in one
    snapshot; ``placeholder`` is the backend's parameter marker (``?``, ``%s``)."""
    limit = f"LIMIT {placeholder}"
    ((total, accounts),) = rows("SELECT COALESCE(SUM(balance), 0), COUNT(*) FROM accounts", ())
    ((issued, withdrawn),) = rows(
        "SELECT COALESCE(SUM(CASE WHEN payer IS NULL THEN amount END), 0),"
        " COALESCE(SUM(CASE WHEN payee IS NULL THEN amount END), 0) FROM movements",
        (),
    )
    found = rows("SELECT balance FROM issuance WHERE id = 1", ())
    issuance = None if not found else int(found[0][0])
    outstanding = int(issued) - int(withdrawn)
    yield Check(
        "conservation",
        int(total) == outstanding and issuance == -outstanding,
        f"sum of {accounts} balances {total}; issued {issued} - withdrawn {withdrawn}"
        f" = {outstanding}; issuance account {issuance}",
    )

    negative = rows(
        f"SELECT name, balance FROM accounts WHERE balance < 0 ORDER BY name {limit}", (_SHOWN,)
    )
    yield Check(
        "no negative balance",
        not negative,
        ", ".join(f"{n}: {b}" for n, b in negative) or "none below 0",
    )

    # Each account's balance is what its movements say: in minus out.
    wrong = rows(
        "SELECT a.name, a.balance, COALESCE(i.total, 0) - COALESCE(o.total, 0)"
        " FROM accounts AS a"
        " LEFT JOIN (SELECT payee AS name, SUM(amount) AS total FROM movements"
        "            WHERE payee IS NOT NULL GROUP BY payee) AS i ON i.name = a.name"
        " LEFT JOIN (SELECT payer AS name, SUM(amount) AS total FROM movements"
        "            WHERE payer IS NOT NULL GROUP BY payer) AS o ON o.name = a.name"
        " WHERE a.balance <> COALESCE(i.total, 0) - COALESCE(o.total, 0)"
        f" ORDER BY a.name {limit}",
        (_SHOWN,),
    )
    yield Check(
        "balances match movements",
        not wrong,
        ", ".join(f"{n}: balance {b}, movements say {m}" for n, b, m in wrong) or "every account",
    )

    repeated = rows(
        "SELECT payment_id, COUNT(*) FROM movements WHERE payment_id IS NOT NULL"
        f" GROUP BY payment_id HAVING COUNT(*) > 1 {limit}",
        (_SHOWN,),
    )
    ((payments,),) = rows("SELECT COUNT(payment_id) FROM movements", ())
    yield Check(
        "each payment id once",
        not repeated,
        ", ".join(f"{pid} x{n}" for pid, n in repeated) or f"{payments} payments",
    )


@final
class SqliteAdmin:
    """:class:`LedgerAdmin` on the SQLite ledger file. The file must exist (an admin command
    never creates a ledger); an older one is migrated, as the server would."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            where = redact(str(path))  # (a mistyped PostgreSQL conninfo may carry a password)
            raise LedgerUnavailable(f"there is no ledger at {where} (is --state-dir right?)")
        self.path = path
        self._db = connect_sqlite(path, BUSY_TIMEOUT_MS)

    def close(self) -> None:
        self._db.close()

    # -- reading --

    def accounts(self) -> list[AccountRow]:
        rows = self._db.execute(
            "SELECT name, kind, balance, frozen, created_ms, last_login_ms FROM accounts"
            " ORDER BY name COLLATE NOCASE"
        ).fetchall()
        return [AccountRow(n, k, b, bool(f), c, last) for n, k, b, f, c, last in rows]

    def movements(self) -> Iterator[Movement]:
        db = self._db
        db.execute("BEGIN")  # one snapshot, however long the export takes
        try:
            for row in db.execute(
                "SELECT seq, at_ms, kind, payer, payee, amount, payer_balance_after,"
                " payee_balance_after, payment_id, reference FROM movements ORDER BY seq"
            ):
                yield Movement(*row)
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    # -- changes: each one short write transaction --

    def _write(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _done(self) -> None:
        self._db.execute("COMMIT")

    def _undo(self) -> None:
        if self._db.in_transaction:
            self._db.rollback()

    def _resolve(self, db: sqlite3.Connection, name: str) -> tuple[str, str, int, int]:
        """The account named ``name`` in any letter case: (name, kind, balance, frozen)."""
        row = db.execute(
            "SELECT name, kind, balance, frozen FROM accounts WHERE name_key = ?",
            (name_key(name),),
        ).fetchone()
        if row is None:
            raise UnknownAccount(f"no account {name!r}")
        return row  # type: ignore[no-any-return]

    def adjust(self, kind: AdjustmentKind, name: str, amount: int, reference: str) -> Adjustment:
        if not 1 <= amount <= MAX_AMOUNT:
            raise AmountOutOfRange(f"the amount must be within 1..{MAX_AMOUNT}")
        db = self._write()
        try:
            first = db.execute(
                "SELECT kind, COALESCE(payee, payer), amount,"
                " COALESCE(payee_balance_after, payer_balance_after), at_ms"
                " FROM movements WHERE reference = ?",
                (reference,),
            ).fetchone()
            if first is not None:
                done_kind, done_name, done_amount, balance, at_ms = first
                resolved = self._resolve(db, name)[0]
                if (done_kind, done_name, done_amount) != (kind, resolved, amount):
                    raise ReferenceConflict(
                        f"the reference {reference!r} was used for a {done_kind} of"
                        f" {done_amount} to {done_name}"
                    )
                self._done()
                return Adjustment(reference, kind, done_name, amount, balance, at_ms, True)
            account, _kind, balance, _frozen = self._resolve(db, name)
            now = _now_ms()
            if kind == "credit":
                balance += amount
                if balance > MAX_BALANCE:
                    raise BalanceLimit(f"the balance would exceed {MAX_BALANCE}")
                db.execute(
                    "INSERT INTO movements(kind, reference, payee, amount, payee_balance_after,"
                    " at_ms) VALUES ('credit', ?, ?, ?, ?, ?)",
                    (reference, account, amount, balance, now),
                )
                db.execute("UPDATE issuance SET balance = balance - ? WHERE id = 1", (amount,))
            else:
                if balance < amount:
                    raise InsufficientFunds(f"{account}'s balance {balance} is less than {amount}")
                balance -= amount
                db.execute(
                    "INSERT INTO movements(kind, reference, payer, amount, payer_balance_after,"
                    " at_ms) VALUES ('debit', ?, ?, ?, ?, ?)",
                    (reference, account, amount, balance, now),
                )
                db.execute("UPDATE issuance SET balance = balance + ? WHERE id = 1", (amount,))
            db.execute("UPDATE accounts SET balance = ? WHERE name = ?", (balance, account))
            self._done()
            return Adjustment(reference, kind, account, amount, balance, now, False)
        finally:
            self._undo()

    def set_frozen(self, name: str, frozen: bool) -> AccountRow:
        db = self._write()
        try:
            account = self._resolve(db, name)[0]
            db.execute("UPDATE accounts SET frozen = ? WHERE name = ?", (int(frozen), account))
            row = db.execute(
                "SELECT name, kind, balance, frozen, created_ms, last_login_ms FROM accounts"
                " WHERE name = ?",
                (account,),
            ).fetchone()
            self._done()
            n, k, b, f, c, last = row
            return AccountRow(n, k, b, bool(f), c, last)
        finally:
            self._undo()

    def reset_password(self, name: str, password_hash: str) -> None:
        db = self._write()
        try:
            account, kind, _balance, _frozen = self._resolve(db, name)
            if kind != "native":
                raise NotNative(f"{account} is a course account: it has no password")
            # Clearing the key revokes the sessions' acceptances: the server's settle reads
            # it inside its transaction. A new login certifies a new key.
            db.execute(
                "UPDATE accounts SET password_hash = ?, peer_key = NULL,"
                " peer_key_expires_ms = NULL WHERE name = ?",
                (password_hash, account),
            )
            self._done()
        finally:
            self._undo()

    # -- checking and copying --

    def audit(self) -> AuditReport:
        db = self._db
        db.execute("BEGIN")  # every check sees the same snapshot
        try:
            return AuditReport(tuple(self._checks(db)))
        finally:
            if db.in_transaction:
                db.execute("COMMIT")

    def _checks(self, db: sqlite3.Connection) -> Iterator[Check]:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
        yield Check("integrity", problems == ["ok"], "; ".join(problems[:_SHOWN]))
        orphans = db.execute("PRAGMA foreign_key_check").fetchall()
        yield Check(
            "references",
            not orphans,
            f"{len(orphans)} row(s) name a missing account" if orphans else "every name exists",
        )

        yield from book_checks(lambda sql, args: db.execute(sql, args).fetchall(), "?")

    def backup(self, dest: Path) -> None:
        if dest.exists():
            raise LedgerError(f"{dest} exists; back up to a new file")
        partial = dest.with_name(f".{dest.name}.partial")
        partial.unlink(missing_ok=True)  # left by a backup that was killed
        # 0600 from the start, like the ledger: the copy holds the password hashes.
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        target = sqlite3.connect(partial)
        try:
            # One step: the whole copy is read in one transaction, a consistent snapshot,
            # while the server goes on writing (WAL).
            self._db.backup(target)
            (check,) = target.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise LedgerError(f"the copy fails its integrity check: {check}")
        except BaseException:
            target.close()
            partial.unlink(missing_ok=True)
            raise
        target.close()
        partial.rename(dest)
