"""What a ledger is, whatever stores it: the refusals (each one means "nothing happened"), the
records it hands out, its limits, and the :class:`Ledger` interface the server uses."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from p2ppay.settings import count, setting
from p2ppay.wire.constraints import MAX_AMOUNT, is_amount

AccountKind = Literal["native", "course"]


# --- the request listing's rule, in the SQL both backends speak ------------------------------

#: The columns a payment request is read with, in :class:`PaymentRequest`'s order.
REQUEST_COLUMNS: Final = (
    "id, requester, payer, amount, memo, created_ms, expires_ms, state, closed_ms"
)
#: The order of a payer's incoming requests (an ORDER BY prefix; ``r`` is the listed request),
#: so that a counterparty's cannot be pushed out of sight by accounts made for the purpose:
#: first those from accounts the payer has paid (only the payer can make an account that), then
#: from accounts that paid the payer (a stranger can buy that with one unit), then the rest;
#: within each group every requester's newest request comes before anyone's second, so N
#: accounts take N places, not 5 N. Each EXISTS is one probe of the movements_pair index.
INCOMING_REQUEST_ORDER: Final = (
    "EXISTS (SELECT 1 FROM movements AS m WHERE m.payer = r.payer AND m.payee = r.requester)"
    " DESC, EXISTS (SELECT 1 FROM movements AS m"
    " WHERE m.payer = r.requester AND m.payee = r.payer) DESC,"
    " ROW_NUMBER() OVER (PARTITION BY r.requester ORDER BY r.created_ms DESC, r.id), "
)

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


class LedgerFileUnusable(LedgerUnavailable):
    """The ledger file cannot be trusted: damaged, missing where a ledger was kept, or no
    longer the file the server opened (deleted, replaced or truncated behind its back).
    Restarting does not help: a person must look (and restore it from a backup)."""


class DepositIdConflict(LedgerError):
    """The deposit id was used before for another account or another amount."""


class UnknownRequest(LedgerError):
    """No payment request has this id, or it is not one this account may act on."""


class RequestNotOpen(LedgerError):
    """The payment request can no longer be paid, declined or cancelled."""


class RequestExpired(RequestNotOpen):
    pass


class RequestPaid(RequestNotOpen):
    pass


class RequestDeclined(RequestNotOpen):
    pass


class RequestCancelled(RequestNotOpen):
    pass


class TooManyRequests(LedgerError):
    """The requester, or the account asked, has as many open requests as allowed."""


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
    memo: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Literal["deposit", "sent", "received"]
    amount: int
    balance: int
    at_ms: int
    counterparty: str | None
    payment_id: uuid.UUID | None
    #: the movement's place in the ledger's one sequence: a history cursor (``before``)
    seq: int
    memo: str | None = None


#: No cursor and no time bound in a history query: the widest range of a 64-bit integer (an
#: SQLite integer, a PostgreSQL BIGINT).
_NO_BOUND_LOW: Final = -(2**63)
_NO_BOUND_HIGH: Final = 2**63 - 1


def history_params(
    registered: str,
    other: str | None,
    limit: int,
    before: int | None,
    since_ms: int | None,
    until_ms: int | None,
) -> dict[str, object]:
    """The named parameters of either backend's history query, for the account ``registered``
    (and ``other``, the counterparty's name as registered, if any)."""
    return {
        "name": registered,
        "limit": limit,
        "before": _NO_BOUND_HIGH if before is None else before,
        "other": other,
        "since": _NO_BOUND_LOW if since_ms is None else since_ms,
        "until": _NO_BOUND_HIGH if until_ms is None else until_ms,
    }


def history_entries(rows: Iterable[Sequence[Any]], registered: str) -> list[Entry]:
    """Rows of either backend's history query as ``registered`` sees them: (seq, kind, payer,
    payee, amount, payer_after, payee_after, at_ms, payment_id, memo); a payment id as a UUID
    or as its text (SQLite)."""
    entries = []
    for seq, kind, payer, payee, amount, payer_after, payee_after, at, pid, memo in rows:
        if kind in ("deposit", "credit"):  # an operator's credit reads as a deposit
            entries.append(Entry("deposit", amount, payee_after, at, None, None, seq))
        elif kind == "debit":  # and a debit as money sent to nobody in particular
            entries.append(Entry("sent", amount, payer_after, at, None, None, seq))
        else:
            payment_id = pid if isinstance(pid, uuid.UUID) else uuid.UUID(pid)
            if payer == registered:
                entries.append(Entry("sent", amount, payer_after, at, payee, payment_id, seq, memo))
            else:
                entries.append(
                    Entry("received", amount, payee_after, at, payer, payment_id, seq, memo)
                )
    return entries


RequestState = Literal["open", "paid", "declined", "cancelled", "expired"]


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A payment request: ``requester`` asks ``payer`` for ``amount``. Its id is also the
    payment id of the transfer that pays it. ``state`` is ``expired`` once ``expires_ms`` has
    passed while it was open."""

    request_id: uuid.UUID
    requester: str  # as registered; the payee
    payer: str
    amount: int
    memo: str | None
    created_ms: int
    expires_ms: int
    state: RequestState
    closed_ms: int | None = None

    def refusal(self) -> RequestNotOpen:
        """Why this request (not open) cannot be paid, declined or cancelled."""
        kinds: dict[str, type[RequestNotOpen]] = {
            "paid": RequestPaid,
            "declined": RequestDeclined,
            "cancelled": RequestCancelled,
            "expired": RequestExpired,
        }
        return kinds[self.state](f"the request {self.request_id} is {self.state}")


@dataclass(frozen=True, slots=True)
class OpenRequests:
    """What ``requests`` shows: the first requests of each side and how many there are."""

    incoming: list[PaymentRequest]  # asking this account to pay
    outgoing: list[PaymentRequest]  # made by it
    incoming_total: int
    outgoing_total: int


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

    async def balance(self, name: str) -> int | None:
        """The account's balance, or None if there is none. A backend may answer from a cache
        that lags another process's writes by a bounded time (SQLite: ``balance_ttl``), never
        its own."""
        ...

    async def set_peer_key(
        self, name: str, key_der: bytes | None, expires_ms: int | None
    ) -> None: ...

    async def deposit(self, name: str, amount: int, deposit_id: uuid.UUID | None = None) -> int:
        """Bring ``amount`` into ``name``; the balance after. With a ``deposit_id``, once: a
        repeat returns the first deposit's balance after it and moves nothing; the same id for
        another account or amount is :class:`DepositIdConflict`."""
        ...

    async def change_password(self, name: str, password_hash: str) -> None:
        """Set a native account's password hash (its current peer key stays)."""
        ...

    async def settle(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        accepted_with: bytes | None = None,
        memo: str | None = None,
    ) -> Transfer:
        """Move ``amount`` once per ``payment_id``. For a new payment ``accepted_with`` (the
        key the payee's acceptance was checked against), the payee's current key must still
        be that one; a retry of a settled payment gets its stored outcome (the same id with
        another payer, payee, amount or memo is :class:`PaymentIdConflict`)."""
        ...

    async def transfer(self, payment_id: uuid.UUID) -> Transfer | None:
        """The settled transfer with this payment id, if any."""
        ...

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
        """``name``'s movements, newest first, at most ``limit``: only those older than the
        movement ``before`` (a ``seq``: the cursor for the next page), with ``counterparty``
        (then deposits and operator's movements are left out), at or after ``since_ms`` and
        before ``until_ms`` (Unix ms)."""
        ...

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
        """Record ``requester``'s request that ``payer`` pay it ``amount``. Refused
        (:class:`TooManyRequests`) when the requester has ``max_open`` unexpired open
        requests already, or ``max_per_payer`` of them to this payer (a count per requester:
        nobody can use up a payer's room for everyone else's requests)."""
        ...

    async def open_requests(self, name: str, limit: int) -> OpenRequests:
        """Unexpired open requests to ``name`` (it is asked to pay) and from it, at most
        ``limit`` of each, and how many of each there are in all. Outgoing: newest first.
        Incoming: those from accounts ``name`` has paid or been paid by first (a request
        from a counterparty cannot be pushed out of sight by fresh accounts'), each group
        newest first."""
        ...

    async def purge_requests(self, closed_before_ms: int, limit: int) -> int:
        """Delete up to ``limit`` requests closed (paid, declined, cancelled) or expired
        before ``closed_before_ms``, in one transaction; how many were deleted."""
        ...

    async def pay_request(
        self, request_id: uuid.UUID, payer: str
    ) -> tuple[Transfer, PaymentRequest]:
        """Pay the open request (``payer`` must be the one asked), exactly once: the transfer's
        payment id is the request id; a retry by the payer after it was paid gets the stored
        outcome. Refused if expired, declined or cancelled. The request as it is now."""
        ...

    async def close_request(
        self, request_id: uuid.UUID, name: str, state: Literal["declined", "cancelled"]
    ) -> PaymentRequest:
        """Decline (``name`` is the payer) or cancel (``name`` is the requester) an open
        request; the request as it is now."""
        ...

    async def request_news(self, name: str) -> list[PaymentRequest]:
        """``name``'s requests paid or declined since it was last told, oldest first; from now
        on they count as told."""
        ...

    async def told(self, request_id: uuid.UUID) -> None:
        """The requester was told (live) that this request was paid or declined."""
        ...

    async def audit(self) -> Audit: ...

    async def record_login(self, name: str) -> None: ...
