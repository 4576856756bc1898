"""The wire's vocabulary: limits, the typed fields of every message, payment ids in
canonical form, and the error codes (:class:`ErrorCode`) with the protocol's two errors."""

from __future__ import annotations

import enum
import re
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeAlias

import msgspec

from p2ppay.wire.constraints import MAX_AMOUNT, MAX_HISTORY, MAX_MEMO, MAX_PORT, MIN_PORT
from p2ppay.wire.errors import CodedError
from p2ppay.wire.names import NAME_PATTERN

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_LINE: Final = 64 * 1024
#: The deepest nesting of JSON arrays and objects a line may have (a request needs 1, the
#: deepest reply 4). Checked before the JSON decoder sees the line; see :func:`too_deep`.
DEFAULT_MAX_DEPTH: Final = 32
#: No configuration may raise the limit past this: the decoder recurses once per level.
MAX_DEPTH_CAP: Final = 256


Name = Annotated[str, msgspec.Meta(pattern=rf"^{NAME_PATTERN}\Z")]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
#: A new password's length, in characters (register, an operator's reset).
NEW_PASSWORD_LENGTH: Final = (8, 1024)
NewPassword = Annotated[
    str, msgspec.Meta(min_length=NEW_PASSWORD_LENGTH[0], max_length=NEW_PASSWORD_LENGTH[1])
]
Amount = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
Balance = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=MIN_PORT, le=MAX_PORT)]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
HistoryLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY)]
#: A history cursor: the ``next`` of the page before (a movement's place in the ledger).
HistoryCursor = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
#: A point in time on the wire: Unix time in milliseconds (history's bounds).
TimeMs = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Pem = Annotated[str, msgspec.Meta(max_length=8192)]
Signature = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: A memo's length; that every character is printable is checked where it is used
#: (``constraints.is_memo``: the server's handlers, the payee, the client).
Memo = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MEMO)]
#: Seconds until a payment request expires.
ExpiresIn = Annotated[int, msgspec.Meta(ge=1, le=10**9)]

#: A payment id on the wire: a UUID in its canonical text form only (36 characters, lower-case
#: hex, dashes at 8-4-4-4-12), so that one payment has exactly one spelling.
CANONICAL_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class _CanonicalUUID(uuid.UUID):
    """What decoding a ``PaymentId`` yields: a :class:`uuid.UUID` (equal to and hashing like
    any other) that was spelled canonically. msgspec hands its text to :func:`dec_hook`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"UUID('{self}')"


if TYPE_CHECKING:
    PaymentId: TypeAlias = uuid.UUID
else:
    PaymentId = _CanonicalUUID


def dec_hook(type_: type[Any], obj: Any) -> Any:
    if type_ is _CanonicalUUID:
        if isinstance(obj, str) and CANONICAL_UUID.fullmatch(obj):
            return _CanonicalUUID(obj)
        raise ValueError("a payment id must be a UUID in canonical form (lower case, dashes)")
    raise NotImplementedError(f"cannot decode {type_!r}")


class ErrorCode(enum.StrEnum):
    """Every error the server can report. Clients branch on these, never on the message."""

    # Framing and syntax (the line was not a valid request).
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    LINE_TOO_LONG = "line_too_long"
    #: the connection is closed: a request line did not complete in time, or no login in time
    TIMEOUT = "timeout"
    UNSUPPORTED_VERSION = "unsupported_version"
    # Session state.
    HELLO_REQUIRED = "hello_required"
    NOT_LOGGED_IN = "not_logged_in"
    ALREADY_LOGGED_IN = "already_logged_in"
    BAD_STATE = "bad_state"
    # Accounts.
    NAME_TAKEN = "name_taken"
    UNKNOWN_USER = "unknown_user"
    #: login: unknown account or wrong password, deliberately the same answer
    AUTH_FAILED = "auth_failed"
    #: login: too many failed attempts for this account or from this address
    RATE_LIMITED = "rate_limited"
    # Money.
    BAD_AMOUNT = "bad_amount"
    BALANCE_LIMIT = "balance_limit"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    SELF_PAYMENT = "self_payment"
    UNKNOWN_PAYEE = "unknown_payee"
    PAYMENT_ID_CONFLICT = "payment_id_conflict"
    BAD_ACCEPTANCE = "bad_acceptance"
    #: the operator froze the payer's or the payee's account
    ACCOUNT_FROZEN = "account_frozen"
    #: deposit: on this server (--deposits operator) only the operator brings money in
    DEPOSITS_CLOSED = "deposits_closed"
    # Identity.
    BAD_CSR = "bad_csr"
    # Presence.
    PAYEE_OFFLINE = "payee_offline"
    #: deposit: the deposit id was used for another account or amount
    DEPOSIT_ID_CONFLICT = "deposit_id_conflict"
    # Payment requests and receipts.
    #: no request by this id that you may pay, decline or cancel
    UNKNOWN_REQUEST = "unknown_request"
    REQUEST_EXPIRED = "request_expired"
    REQUEST_PAID = "request_paid"
    REQUEST_DECLINED = "request_declined"
    REQUEST_CANCELLED = "request_cancelled"
    #: you, or the account you ask, have as many open requests as the server allows
    TOO_MANY_REQUESTS = "too_many_requests"
    #: receipt: no settled payment by this id that you paid or received
    UNKNOWN_PAYMENT = "unknown_payment"
    # Server.
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal_error"


class ProtocolError(CodedError):
    """A violation of the protocol, with the code the peer is told."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the connection cannot recover from (it must be closed)."""
