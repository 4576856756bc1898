"""Where money moves: accounts, deposits and exactly-once transfers, durably.

- :mod:`.interface`: the refusals, the records, the limits and the :class:`Ledger` interface
- :mod:`.schema`: the SQLite tables and their migrations (:func:`connect_sqlite`)
- :mod:`.sqlite`: the SQLite ledger (group commit on one writer thread, reads beside it)
- :mod:`.pgschema`, :mod:`.postgres`: the PostgreSQL ledger, shared by several nodes
- :mod:`.pgtimeouts`: how long it waits for PostgreSQL (keepalives, timeouts, a watchdog)
- :mod:`.admin`: the operator's view of a ledger file (``p2ppay admin``)

:func:`open_ledger` opens either: a ``postgresql://`` (or ``postgres://``) URL is PostgreSQL,
anything else the path of an SQLite file.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

from p2ppay.ledger.interface import (
    Account,
    AccountFrozen,
    AccountKind,
    AmountOutOfRange,
    Audit,
    BalanceLimit,
    DepositIdConflict,
    Entry,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LedgerFileUnusable,
    LedgerObserver,
    LedgerUnavailable,
    Limits,
    NameTaken,
    OpenRequests,
    PaymentIdConflict,
    PaymentRequest,
    ReferenceConflict,
    RequestCancelled,
    RequestDeclined,
    RequestExpired,
    RequestNotOpen,
    RequestPaid,
    RequestState,
    SelfPayment,
    TooManyRequests,
    Transfer,
    Unauthorized,
    UnknownAccount,
    UnknownPayee,
    UnknownRequest,
)
from p2ppay.ledger.pgschema import PG_SCHEMA_VERSION, connect_postgres
from p2ppay.ledger.pgtimeouts import PgTimeouts
from p2ppay.ledger.postgres import SETTLED_CHANNEL, PostgresLedger, open_postgres_ledger
from p2ppay.ledger.schema import SCHEMA_V1, SCHEMA_VERSION, connect_sqlite
from p2ppay.ledger.sqlite import SqliteLedger, open_sqlite_ledger

#: Either backend, with what the server's runner uses beside the :class:`Ledger` interface
#: (``observer``, ``commits``, ``ops_committed``, ``invalid_names()``, ``max_batch``).
AnyLedger = SqliteLedger | PostgresLedger

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_ledger(
    target: str | Path,
    limits: Limits | None = None,
    *,
    max_batch: int = 512,
    balance_ttl: float = 0.5,
    pg_timeouts: PgTimeouts | None = None,
    check_interval: float = 1.0,
) -> AbstractAsyncContextManager[AnyLedger]:
    """The ledger at ``target``: a PostgreSQL URL, or else the path of an SQLite file
    (``balance_ttl``, ``check_interval``: see :class:`SqliteLedger`; PostgreSQL has no balance
    cache and no file to watch; ``pg_timeouts``: PostgreSQL's alone)."""
    if is_postgres_url(target):
        return open_postgres_ledger(str(target), limits, max_batch=max_batch, timeouts=pg_timeouts)
    return open_sqlite_ledger(
        target,
        limits,
        max_batch=max_batch,
        balance_ttl=balance_ttl,
        check_interval=check_interval,
    )


__all__ = [
    "PG_SCHEMA_VERSION",
    "POSTGRES_SCHEMES",
    "SCHEMA_V1",
    "SCHEMA_VERSION",
    "SETTLED_CHANNEL",
    "Account",
    "AccountFrozen",
    "AccountKind",
    "AmountOutOfRange",
    "AnyLedger",
    "Audit",
    "BalanceLimit",
    "DepositIdConflict",
    "Entry",
    "InsufficientFunds",
    "Ledger",
    "LedgerError",
    "LedgerFileUnusable",
    "LedgerObserver",
    "LedgerUnavailable",
    "Limits",
    "NameTaken",
    "OpenRequests",
    "PaymentIdConflict",
    "PaymentRequest",
    "PgTimeouts",
    "PostgresLedger",
    "ReferenceConflict",
    "RequestCancelled",
    "RequestDeclined",
    "RequestExpired",
    "RequestNotOpen",
    "RequestPaid",
    "RequestState",
    "SelfPayment",
    "SqliteLedger",
    "TooManyRequests",
    "Transfer",
    "Unauthorized",
    "UnknownAccount",
    "UnknownPayee",
    "UnknownRequest",
    "connect_postgres",
    "connect_sqlite",
    "is_postgres_url",
    "open_ledger",
    "open_postgres_ledger",
    "open_sqlite_ledger",
]
