"""The operator's view of a PostgreSQL ledger: :class:`~.admin.LedgerAdmin` for ``p2ppay admin
--ledger postgresql://...``, beside running nodes.

Every change is one short transaction that locks what it touches (the account row, then the
issuance row: the order a deposit takes them in), so it serialises with the nodes' batches;
the nodes read what matters (frozen, the payee's key) inside their settle transaction, so a
change holds from their next batch on. Reads (accounts, audit, export) run in one
``REPEATABLE READ`` snapshot. Plain blocking code: the admin command is a short-lived process.
A backup is PostgreSQL's own business (``pg_dump``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, final

from psycopg import errors as pgerrors

from p2ppay.ledger.admin import (
    AccountRow,
    Adjustment,
    AdjustmentKind,
    AuditReport,
    Movement,
    NotNative,
    book_checks,
)
from p2ppay.ledger.interface import (
    AmountOutOfRange,
    BalanceLimit,
    InsufficientFunds,
    LedgerError,
    LedgerUnavailable,
    ReferenceConflict,
    UnknownAccount,
)
from p2ppay.ledger.pgschema import PgConnection, describe, migrate, open_connection
from p2ppay.wire.constraints import MAX_AMOUNT
from p2ppay.wire.names import name_key

#: no balance may pass this, whatever the server's --max-balance (which bounds only users)
MAX_BALANCE: Final = MAX_AMOUNT
#: a change that loses a deadlock to a node's batch is tried again this many times
_ATTEMPTS: Final = 5

_ACCOUNT_COLUMNS = "name, kind, balance, frozen, created_ms, last_login_ms"


def _now_ms() -> int:
    return int(time.time() * 1000)


@final
class PgAdmin:
    """:class:`~.admin.LedgerAdmin` on a PostgreSQL ledger. The database must already hold
    one (an admin command never creates a ledger); an older schema is migrated, as a node
    would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db: PgConnection = open_connection(url, autocommit=False)
        try:
            with self._db.transaction():
                row = self._db.execute("SELECT to_regclass('p2ppay_schema')").fetchone()
            if row is None or row[0] is None:
                raise LedgerUnavailable(
                    f"there is no p2ppay ledger at {describe(url)} (is --ledger right?)"
                )
            migrate(self._db, url)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    # -- reading --

    def accounts(self) -> list[AccountRow]:
        with self._db.transaction():
            rows = self._db.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name_key"
            ).fetchall()
        return [AccountRow(n, k, b, bool(f), c, last) for n, k, b, f, c, last in rows]

    def movements(self) -> Iterator[Movement]:
        db = self._db
        with db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            with db.cursor(name="p2ppay_export") as cur:  # server-side: streams, any size
                cur.execute(
                    "SELECT seq, at_ms, kind, payer, payee, amount, payer_balance_after,"
                    " payee_balance_after, payment_id::text, reference FROM movements"
                    " ORDER BY seq"
                )
                for row in cur:
                    yield Movement(*row)

    # -- changes: each one short transaction, tried again if it loses a deadlock --

    def _resolve(self, name: str) -> tuple[str, str, int, bool]:
        """Lock the account named ``name`` in any letter case: (name, kind, balance, frozen)."""
        row = self._db.execute(
            "SELECT name, kind, balance, frozen FROM accounts WHERE name_key = %s"
            " FOR NO KEY UPDATE",
            (name_key(name),),
        ).fetchone()
        if row is None:
            raise UnknownAccount(f"no account {name!r}")
        return row[0], row[1], int(row[2]), bool(row[3])

    def adjust(self, kind: AdjustmentKind, name: str, amount: int, reference: str) -> Adjustment:
        if not 1 <= amount <= MAX_AMOUNT:
            raise AmountOutOfRange(f"the amount must be within 1..{MAX_AMOUNT}")
        for attempt in range(_ATTEMPTS):
            try:
                with self._db.transaction():
                    return self._adjust(kind, name, amount, reference)
            except pgerrors.DeadlockDetected:
                if attempt == _ATTEMPTS - 1:
                    raise LedgerUnavailable("the ledger stayed too busy; try again") from None
        raise AssertionError("unreachable")

    def _adjust(self, kind: AdjustmentKind, name: str, amount: int, reference: str) -> Adjustment:
        db = self._db
        # Two operators using one reference at once: the second waits here, then replays.
        db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (reference,))
        account, _kind, balance, _frozen = self._resolve(name)
        first = db.execute(
            "SELECT kind, COALESCE(payee, payer), amount,"
            " COALESCE(payee_balance_after, payer_balance_after), at_ms"
            " FROM movements WHERE reference = %s",
            (reference,),
        ).fetchone()
        if first is not None:
            done_kind, done_name, done_amount, done_balance, at_ms = first
            if (done_kind, done_name, done_amount) != (kind, account, amount):
                raise ReferenceConflict(
                    f"the reference {reference!r} was used for a {done_kind} of"
                    f" {done_amount} to {done_name}"
                )
            return Adjustment(reference, kind, done_name, amount, done_balance, at_ms, True)
        now = _now_ms()
        if kind == "credit":
            balance += amount
            if balance > MAX_BALANCE:
                raise BalanceLimit(f"the balance would exceed {MAX_BALANCE}")
            db.execute(
                "INSERT INTO movements(kind, reference, payee, amount, payee_balance_after,"
                " at_ms) VALUES ('credit', %s, %s, %s, %s, %s)",
                (reference, account, amount, balance, now),
            )
            db.execute("UPDATE issuance SET balance = balance - %s WHERE id = 1", (amount,))
        else:
            if balance < amount:
                raise InsufficientFunds(f"{account}'s balance {balance} is less than {amount}")
            balance -= amount
            db.execute(
                "INSERT INTO movements(kind, reference, payer, amount, payer_balance_after,"
                " at_ms) VALUES ('debit', %s, %s, %s, %s, %s)",
                (reference, account, amount, balance, now),
            )
            db.execute("UPDATE issuance SET balance = balance + %s WHERE id = 1", (amount,))
        db.execute("UPDATE accounts SET balance = %s WHERE name = %s", (balance, account))
        return Adjustment(reference, kind, account, amount, balance, now, False)

    def set_frozen(self, name: str, frozen: bool) -> AccountRow:
        with self._db.transaction():
            account = self._resolve(name)[0]
            row = self._db.execute(
                f"UPDATE accounts SET frozen = %s WHERE name = %s RETURNING {_ACCOUNT_COLUMNS}",
                (frozen, account),
            ).fetchone()
        assert row is not None
        n, k, b, f, c, last = row
        return AccountRow(n, k, b, bool(f), c, last)

    def reset_password(self, name: str, password_hash: str) -> None:
        with self._db.transaction():
            account, kind, _balance, _frozen = self._resolve(name)
            if kind != "native":
                raise NotNative(f"{account} is a course account: it has no password")
            # Clearing the key revokes the sessions' acceptances: every node's settle reads
            # it inside its transaction. A new login certifies a new key.
            self._db.execute(
                "UPDATE accounts SET password_hash = %s, peer_key = NULL,"
                " peer_key_expires_ms = NULL WHERE name = %s",
                (password_hash, account),
            )

    # -- checking and copying --

    def audit(self) -> AuditReport:
        db = self._db
        with db.transaction():  # every check sees the same snapshot
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return AuditReport(
                tuple(book_checks(lambda sql, args: db.execute(sql, args).fetchall(), "%s"))
            )

    def backup(self, dest: Path) -> None:
        raise LedgerError(
            f"a PostgreSQL ledger ({describe(self.url)}) is backed up with PostgreSQL's own"
            f" tools: pg_dump -Fc -f {dest} DBNAME"
        )
