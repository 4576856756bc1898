"""Every message, typed: requests, their results, server events, and the peer-to-peer
messages; and what the two ends' ``next_event()`` return besides messages."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from p2ppay.wire.vocabulary import (
    Amount,
    ErrorCode,
    ExpiresIn,
    HistoryCursor,
    HistoryLimit,
    Memo,
    Name,
    NewPassword,
    Password,
    PaymentId,
    Pem,
    Port,
    RequestId,
    Signature,
    TimeMs,
)

# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class RequestBase(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    id: RequestId


class Hello(RequestBase, tag="hello"):
    version: int
    client: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Register(RequestBase, tag="register"):
    name: Name
    password: NewPassword


class Login(RequestBase, tag="login"):
    name: Name
    password: Password
    p2p_port: Port | None = None
    #: PEM certificate signing request for this session's peer key (EC P-256)
    csr: Pem | None = None


class Deposit(RequestBase, tag="deposit", omit_defaults=True):
    # (omit_defaults: a deposit without an id stays what servers before deposit ids understand)
    amount: Amount
    #: the client's id for this deposit: a retry with it moves money once
    deposit_id: PaymentId | None = None


class ListOnline(RequestBase, tag="list"):
    pass


class Lookup(RequestBase, tag="lookup"):
    name: Name


class Settle(RequestBase, tag="settle", omit_defaults=True):
    # (omit_defaults: a settle without a memo stays what servers before memos understand)
    payment_id: PaymentId
    payee: Name
    amount: Amount
    #: the payee's signature over the payment (base64 of DER ECDSA), from its accept message
    acceptance: Signature
    memo: Memo | None = None


class History(RequestBase, tag="history", omit_defaults=True):
    # (omit_defaults: a plain request stays what servers before the filters understand)
    limit: HistoryLimit = 50
    #: only movements older than this cursor (the ``next`` of the page before)
    before: HistoryCursor | None = None
    #: only movements with this account (``with`` on the wire; leaves out deposits)
    counterparty: Name | None = msgspec.field(default=None, name="with")
    #: only movements at or after ``since_ms``, and before ``until_ms`` (Unix ms)
    since_ms: TimeMs | None = None
    until_ms: TimeMs | None = None


class PaymentStatus(RequestBase, tag="payment_status"):
    payment_id: PaymentId


class Logout(RequestBase, tag="logout"):
    pass


class MakeRequest(RequestBase, tag="request"):
    """Ask ``payer`` to pay me ``amount`` (a payment request, held by the server)."""

    payer: Name
    amount: Amount
    memo: Memo | None = None
    #: seconds until it expires (default and maximum: the server's)
    expires_in: ExpiresIn | None = None


class ListRequests(RequestBase, tag="requests"):
    pass


class PayRequest(RequestBase, tag="pay_request"):
    request_id: PaymentId


class DeclineRequest(RequestBase, tag="decline_request"):
    request_id: PaymentId


class CancelRequest(RequestBase, tag="cancel_request"):
    request_id: PaymentId


class GetReceipt(RequestBase, tag="receipt"):
    payment_id: PaymentId


class Passwd(RequestBase, tag="passwd"):
    old_password: Password
    new_password: NewPassword


Request: TypeAlias = (
    Hello
    | Register
    | Login
    | Deposit
    | ListOnline
    | Lookup
    | Settle
    | History
    | PaymentStatus
    | Logout
    | MakeRequest
    | ListRequests
    | PayRequest
    | DeclineRequest
    | CancelRequest
    | GetReceipt
    | Passwd
)


def op_of(request: Request | type[RequestBase]) -> str:
    """A request's op (its ``op`` tag); also of a request type."""
    return str(request.__struct_config__.tag)


# Results: the payload of an ``ok: true`` reply, one type per op.


class HelloResult(msgspec.Struct, frozen=True):
    version: int
    server: str


class RegisterResult(msgspec.Struct, frozen=True):
    name: str


class Presence(msgspec.Struct, frozen=True):
    """Where an online user is: the address the server observed and the port they advertised."""

    name: str
    ip: str
    port: int | None


class RequestInfo(msgspec.Struct, frozen=True):
    """A payment request: ``requester`` asks ``payer`` for ``amount``. ``state``: open, paid,
    declined, cancelled or expired. Paying it makes the payment whose id is ``request_id``."""

    request_id: PaymentId
    requester: str
    payer: str
    amount: int
    memo: str | None
    created_ms: int
    expires_ms: int
    state: str
    closed_ms: int | None = None


class LoginResult(msgspec.Struct, frozen=True):
    name: str
    balance: int
    ip: str
    port: int | None
    #: the session's peer certificate (PEM) and the CA that issued it, when a CSR was sent
    certificate: str | None = None
    peer_ca: str | None = None
    #: your requests paid or declined since you were last told (oldest first)
    request_news: list[RequestInfo] = msgspec.field(default_factory=list)


class BalanceResult(msgspec.Struct, frozen=True):
    balance: int


class ListResult(msgspec.Struct, frozen=True):
    balance: int
    online: list[Presence]


class SettleResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The outcome of a settlement; a retry with the same payment id gets it again, unchanged.
    (No memo: no ``memo`` field, as before memos.)"""

    payment_id: PaymentId
    payer: str
    payee: str
    amount: int
    balance: int  # the payer's balance right after this payment
    memo: str | None = None


class HistoryEntry(msgspec.Struct, frozen=True):
    kind: Literal["deposit", "sent", "received"]
    amount: int
    balance: int  # the account's balance right after this entry
    at_ms: int
    counterparty: str | None = None
    payment_id: PaymentId | None = None
    memo: str | None = None


class HistoryResult(msgspec.Struct, frozen=True):
    entries: list[HistoryEntry]
    #: the cursor for the next page (``before``), or None: there is no more
    next: int | None = None


class PaymentStatusResult(msgspec.Struct, frozen=True):
    """Whether a payment id is settled. Only its payer and payee learn more than "not
    settled": to anyone else a settled payment looks exactly like an unknown id."""

    payment_id: PaymentId
    settled: bool
    payer: str | None = None
    payee: str | None = None
    amount: int | None = None
    at_ms: int | None = None
    #: the asker's own balance right after the payment
    balance: int | None = None
    #: the payment's memo, if it has one
    memo: str | None = None


class LogoutResult(msgspec.Struct, frozen=True):
    pass


class RequestsResult(msgspec.Struct, frozen=True):
    """Open requests: ``incoming`` ask you to pay (those of accounts you have paid or been
    paid by first), ``outgoing`` are yours; newest first. The lists are the server's first
    --max-open-requests of each; the totals say how many there are in all (None: a server
    from before the totals)."""

    incoming: list[RequestInfo]
    outgoing: list[RequestInfo]
    incoming_total: int | None = None
    outgoing_total: int | None = None


class Receipt(msgspec.Struct, frozen=True):
    """A settlement's receipt, signed by the server's receipt key (see p2ppay.receipts)."""

    format: str
    payment_id: str
    payer: str
    payee: str
    amount: int
    memo: str | None
    at_ms: int
    certificate: str
    signature: str


class PasswdResult(msgspec.Struct, frozen=True):
    pass


Result: TypeAlias = (
    HelloResult
    | RegisterResult
    | LoginResult
    | BalanceResult
    | ListResult
    | Presence
    | SettleResult
    | HistoryResult
    | PaymentStatusResult
    | LogoutResult
    | RequestInfo
    | RequestsResult
    | Receipt
    | PasswdResult
)

#: Every op, declared once: its request type and the type of its result. (Which op is legal
#: when is the state table's business: :data:`~p2ppay.protocol.state.TRANSITIONS`.)
OP_TYPES: Final[Mapping[str, tuple[type[RequestBase], type[Any]]]] = {
    op_of(request): (request, result)
    for request, result in (
        (Hello, HelloResult),
        (Register, RegisterResult),
        (Login, LoginResult),
        (Deposit, BalanceResult),
        (ListOnline, ListResult),
        (Lookup, Presence),
        (Settle, SettleResult),
        (History, HistoryResult),
        (PaymentStatus, PaymentStatusResult),
        (Logout, LogoutResult),
        (MakeRequest, RequestInfo),
        (ListRequests, RequestsResult),
        (PayRequest, SettleResult),
        (DeclineRequest, RequestInfo),
        (CancelRequest, RequestInfo),
        (GetReceipt, Receipt),
        (Passwd, PasswdResult),
    )
}
OPS: Final[frozenset[str]] = frozenset(OP_TYPES)
RESULT_TYPES: Final[Mapping[str, type[Any]]] = {op: t for op, (_, t) in OP_TYPES.items()}


# Server-pushed events.


class EventBase(msgspec.Struct, tag_field="event", forbid_unknown_fields=False):
    pass


class PaymentReceived(EventBase, tag="payment_received", omit_defaults=True):
    payment_id: PaymentId
    payer: str
    amount: int
    balance: int  # the payee's balance right after this payment
    memo: str | None = None


class PaymentRequested(EventBase, tag="payment_request"):
    """Someone asks you to pay them (``request``)."""

    request: RequestInfo


class RequestClosed(EventBase, tag="request_closed"):
    """A request between you and someone else was paid or declined (told to its requester)
    or cancelled (told to its payer)."""

    request: RequestInfo


class SessionReplaced(EventBase, tag="session_replaced"):
    message: str


class ServerClosing(EventBase, tag="server_closing"):
    message: str


Event: TypeAlias = (
    PaymentReceived | SessionReplaced | ServerClosing | PaymentRequested | RequestClosed
)


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str


# What the two sides' next_event() return besides messages.


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


class Rejected(msgspec.Struct, frozen=True):
    """A request line the server must answer with an error; the connection stays usable."""

    id: int | None
    code: ErrorCode
    message: str


class ReplyOk(msgspec.Struct, frozen=True):
    id: int
    op: str
    result: Any


class ReplyError(msgspec.Struct, frozen=True):
    id: int | None
    code: str
    message: str


# Peer-to-peer messages (payer <-> payee), on the same framing.


class PeerMessageBase(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class Offer(PeerMessageBase, tag="offer", omit_defaults=True):
    """Payer -> payee: "I would like to pay you this" (an offer without a memo is encoded
    without the field, as before memos)."""

    payment_id: PaymentId
    payer: Name
    payee: Name
    amount: Amount
    memo: Memo | None = None


class Accept(PeerMessageBase, tag="accept"):
    """Payee -> payer: yes, with the payee's signature for the server (see docs/protocol.md)."""

    payment_id: PaymentId
    signature: Signature


class Decline(PeerMessageBase, tag="decline"):
    """Payee -> payer: no (``payment_id`` is null when the offer could not be read)."""

    payment_id: PaymentId | None
    reason: Annotated[str, msgspec.Meta(max_length=200)]


class NotSettled(PeerMessageBase, tag="not_settled"):
    """Payer -> payee, after an accepted offer: the server did not settle it (no reply).

    Only news: the server's ``payment_received`` event is what tells a payee it was paid."""

    payment_id: PaymentId
    reason: Annotated[str, msgspec.Meta(max_length=200)]


PeerMessage: TypeAlias = Offer | Accept | Decline | NotSettled
