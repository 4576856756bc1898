"""Where money moves: accounts, deposits and exactly-once transfers, durably.

- :mod:`.interface`: the refusals, the records, the limits and the :class:`Ledger` interface
- :mod:`.schema`: the SQLite tables and their migrations (:func:`connect_sqlite`)
- :mod:`.sqlite`: the SQLite ledger (group commit on one writer thread, reads beside it)
- :mod:`.admin`: the operator's view of a ledger file (``p2ppay admin``)
"""

from __future__ import annotations

from .interface import (
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
    LedgerObserver,
    LedgerUnavailable,
    Limits,
    NameTaken,
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
from .schema import SCHEMA_V1, SCHEMA_VERSION, connect_sqlite
from .sqlite import SqliteLedger, open_sqlite_ledger

__all__ = [
    "SCHEMA_V1",
    "SCHEMA_VERSION",
    "Account",
    "AccountFrozen",
    "AccountKind",
    "AmountOutOfRange",
    "Audit",
    "BalanceLimit",
    "DepositIdConflict",
    "Entry",
    "InsufficientFunds",
    "Ledger",
    "LedgerError",
    "LedgerObserver",
    "LedgerUnavailable",
    "Limits",
    "NameTaken",
    "PaymentIdConflict",
    "PaymentRequest",
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
    "connect_sqlite",
    "open_sqlite_ledger",
]
