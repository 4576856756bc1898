"""The native wire protocol, sans-I/O: bytes in, typed events out; typed messages in, bytes out.

One UTF-8 JSON object per ``\\n``-terminated line, with a hard maximum line length. Requests carry
``id`` and ``op``; replies echo the ``id`` with ``ok`` and a ``result`` or an ``error``; events
pushed by the server carry ``event`` and no ``id``. ``docs/protocol.md`` is the normative spec.

Nothing here does I/O: no trio, no sockets, no sqlite. Whoever owns the connection feeds received
bytes to :meth:`ServerConnection.receive_data` (or the client twin), pulls events with
``next_event()`` and writes the bytes the send methods return.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_LINE: Final = 64 * 1024

#: The largest amount the protocol can carry at all. The server's configured limits are lower;
#: this bound only keeps every sum far away from SQLite's 64-bit integer range.
MAX_AMOUNT: Final = 10**15

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}\Z")]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
NewPassword = Annotated[str, msgspec.Meta(min_length=8, max_length=1024)]
Amount = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
Balance = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1024, le=65535)]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
HistoryLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Pem = Annotated[str, msgspec.Meta(max_length=8192)]
Signature = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ErrorCode(enum.StrEnum):
    """Every error the server can report. Clients branch on these, never on the message."""

    # Framing and syntax (the line was not a valid request).
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    LINE_TOO_LONG = "line_too_long"
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
    # Server.
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal_error"


class ProtocolError(Exception):
    """A violation of the protocol, with the code the peer is told."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the connection cannot recover from (it must be closed)."""


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


class LineBuffer:
    """Splits a byte stream into ``\\n``-terminated lines of at most ``max_line`` bytes.

    The buffer never holds more than ``max_line`` bytes plus one received chunk: as soon as a
    line is known to be too long, :class:`RemoteProtocolError` is raised instead of buffering on.
    """

    __slots__ = ("_buf", "_scan", "max_line")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 2:
            raise ValueError("max_line must be at least 2 bytes")
        self.max_line = max_line
        self._buf = bytearray()
        self._scan = 0  # everything before this offset is known to hold no newline

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete line."""
        return len(self._buf)

    def next_line(self) -> bytes | None:
        """The next complete line without its terminator, or None if more bytes are needed."""
        idx = self._buf.find(b"\n", self._scan)
        if idx < 0:
            self._scan = len(self._buf)
            if len(self._buf) > self.max_line:
                raise RemoteProtocolError(
                    ErrorCode.LINE_TOO_LONG, f"line longer than {self.max_line} bytes"
                )
            return None
        if idx + 1 > self.max_line:
            raise RemoteProtocolError(
                ErrorCode.LINE_TOO_LONG, f"line longer than {self.max_line} bytes"
            )
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        self._scan = 0
        return line


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class _Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    id: RequestId


class Hello(_Request, tag="hello"):
    version: int
    client: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Register(_Request, tag="register"):
    name: Name
    password: NewPassword


class Login(_Request, tag="login"):
    name: Name
    password: Password
    p2p_port: Port | None = None
    #: PEM certificate signing request for this session's peer key (EC P-256)
    csr: Pem | None = None


class Deposit(_Request, tag="deposit"):
    amount: Amount


class ListOnline(_Request, tag="list"):
    pass


class Lookup(_Request, tag="lookup"):
    name: Name


class Settle(_Request, tag="settle"):
    payment_id: uuid.UUID
    payee: Name
    amount: Amount
    #: the payee's signature over the payment (base64 of DER ECDSA), from its accept message
    acceptance: Signature


class History(_Request, tag="history"):
    limit: HistoryLimit = 50


class Logout(_Request, tag="logout"):
    pass


Request: TypeAlias = (
    Hello | Register | Login | Deposit | ListOnline | Lookup | Settle | History | Logout
)
Op: TypeAlias = Literal[
    "hello", "register", "login", "deposit", "list", "lookup", "settle", "history", "logout"
]
OPS: Final[frozenset[str]] = frozenset(
    str(t.__struct_config__.tag)
    for t in (Hello, Register, Login, Deposit, ListOnline, Lookup, Settle, History, Logout)
)


def op_of(request: Request) -> str:
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


class LoginResult(msgspec.Struct, frozen=True):
    name: str
    balance: int
    ip: str
    port: int | None
    #: the session's peer certificate (PEM) and the CA that issued it, when a CSR was sent
    certificate: str | None = None
    peer_ca: str | None = None


class BalanceResult(msgspec.Struct, frozen=True):
    balance: int


class ListResult(msgspec.Struct, frozen=True):
    balance: int
    online: list[Presence]


class SettleResult(msgspec.Struct, frozen=True):
    """The outcome of a settlement; a retry with the same payment id gets it again, unchanged."""

    payment_id: uuid.UUID
    payer: str
    payee: str
    amount: int
    balance: int  # the payer's balance right after this payment


class HistoryEntry(msgspec.Struct, frozen=True):
    kind: Literal["deposit", "sent", "received"]
    amount: int
    balance: int  # the account's balance right after this entry
    at_ms: int
    counterparty: str | None = None
    payment_id: uuid.UUID | None = None


class HistoryResult(msgspec.Struct, frozen=True):
    entries: list[HistoryEntry]


class LogoutResult(msgspec.Struct, frozen=True):
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
    | LogoutResult
)

RESULT_TYPES: Final[Mapping[str, type[Any]]] = {
    "hello": HelloResult,
    "register": RegisterResult,
    "login": LoginResult,
    "deposit": BalanceResult,
    "list": ListResult,
    "lookup": Presence,
    "settle": SettleResult,
    "history": HistoryResult,
    "logout": LogoutResult,
}


# Server-pushed events.


class _Event(msgspec.Struct, tag_field="event", forbid_unknown_fields=False):
    pass


class PaymentReceived(_Event, tag="payment_received"):
    payment_id: uuid.UUID
    payer: str
    amount: int
    balance: int  # the payee's balance right after this payment


class SessionReplaced(_Event, tag="session_replaced"):
    message: str


class ServerClosing(_Event, tag="server_closing"):
    message: str


Event: TypeAlias = PaymentReceived | SessionReplaced | ServerClosing


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


class _PeerMessage(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class Offer(_PeerMessage, tag="offer"):
    """Payer -> payee: "I would like to pay you this"."""

    payment_id: uuid.UUID
    payer: Name
    payee: Name
    amount: Amount


class Accept(_PeerMessage, tag="accept"):
    """Payee -> payer: yes, with the payee's signature for the server (see docs/protocol.md)."""

    payment_id: uuid.UUID
    signature: Signature


class Decline(_PeerMessage, tag="decline"):
    """Payee -> payer: no (``payment_id`` is null when the offer could not be read)."""

    payment_id: uuid.UUID | None
    reason: Annotated[str, msgspec.Meta(max_length=200)]


class NotSettled(_PeerMessage, tag="not_settled"):
    """Payer -> payee, after an accepted offer: the server did not settle it (no reply).

    Only news: the server's ``payment_received`` event is what tells a payee it was paid."""

    payment_id: uuid.UUID
    reason: Annotated[str, msgspec.Meta(max_length=200)]


PeerMessage: TypeAlias = Offer | Accept | Decline | NotSettled
_peer_decoder = msgspec.json.Decoder(PeerMessage)


def decode_peer_message(line: bytes) -> PeerMessage:
    """Decode one peer line; raises :class:`RemoteProtocolError` with a clear message."""
    try:
        message: PeerMessage = _peer_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        explained = _explain_bad_line(line, exc)
        raise RemoteProtocolError(explained.code, explained.message) from None
    return message


def encode_peer_message(message: PeerMessage) -> bytes:
    return _encoder.encode(message) + b"\n"


# --------------------------------------------------------------------------------------------
# Session states: the one table of legal requests
# --------------------------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    ANONYMOUS = "anonymous"
    AUTHENTICATED = "authenticated"


_A = State.AWAIT_HELLO
_N = State.ANONYMOUS
_U = State.AUTHENTICATED

#: (state, op) -> state after a successful reply. A pair missing here is illegal.
TRANSITIONS: Final[Mapping[tuple[State, str], State]] = {
    (_A, "hello"): _N,
    (_N, "register"): _N,
    (_N, "login"): _U,
    (_U, "deposit"): _U,
    (_U, "list"): _U,
    (_U, "lookup"): _U,
    (_U, "settle"): _U,
    (_U, "history"): _U,
    (_U, "logout"): _N,
}


def _illegal(state: State, op: str) -> tuple[ErrorCode, str]:
    if state is _A:
        return ErrorCode.HELLO_REQUIRED, "send hello first"
    if state is _N:
        if op == "hello":
            return ErrorCode.BAD_STATE, "hello was already done"
        return ErrorCode.NOT_LOGGED_IN, f"log in before {op}"
    if op in ("login", "register"):
        return ErrorCode.ALREADY_LOGGED_IN, "already logged in; log out first"
    return ErrorCode.BAD_STATE, f"{op} is not allowed now"


# --------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------

_request_decoder = msgspec.json.Decoder(Request)
_event_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


class _Incoming(msgspec.Struct):
    """What a client can receive: a reply (``id`` + ``ok``) or an event (``event``)."""

    id: int | None = None
    ok: bool | None = None
    result: msgspec.Raw = msgspec.Raw()
    error: ErrorBody | None = None
    event: str | None = None


_incoming_decoder = msgspec.json.Decoder(_Incoming)


class _OkWire(msgspec.Struct):
    id: int
    result: Any
    ok: bool = True


class _ErrWire(msgspec.Struct):
    id: int | None
    error: ErrorBody
    ok: bool = False


def _explain_bad_line(line: bytes, exc: Exception) -> Rejected:
    """Work out the clearest error for a line that did not decode as a request."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(None, ErrorCode.BAD_REQUEST, "line is not valid UTF-8")
    try:
        raw = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return Rejected(None, ErrorCode.BAD_REQUEST, f"not a JSON object: {exc}")
    if not isinstance(raw, dict):
        return Rejected(None, ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    rid = raw.get("id")
    req_id = rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else None
    op = raw.get("op")
    if isinstance(op, str) and op not in OPS:
        return Rejected(req_id, ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}")
    return Rejected(req_id, ErrorCode.BAD_REQUEST, str(exc))


def decode_request(line: bytes) -> Request | Rejected:
    """Decode one request line (without its terminator)."""
    try:
        request: Request = _request_decoder.decode(line)
        return request
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _explain_bad_line(line, exc)


def encode_request(request: Request) -> bytes:
    return _encoder.encode(request) + b"\n"


def encode_ok(request_id: int, result: Result) -> bytes:
    return _encoder.encode(_OkWire(request_id, result)) + b"\n"


def encode_error(request_id: int | None, code: ErrorCode | str, message: str) -> bytes:
    return _encoder.encode(_ErrWire(request_id, ErrorBody(str(code), message))) + b"\n"


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event) + b"\n"


# --------------------------------------------------------------------------------------------
# The two ends of a connection
# --------------------------------------------------------------------------------------------


class ServerConnection:
    """The server's view of one native-protocol connection.

    Requests are handled one at a time: the server takes a request from :meth:`next_event`,
    answers it with :meth:`send_ok` or :meth:`send_error`, and only then takes the next one,
    so the state a request is checked against is the state its predecessors left.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._lines = LineBuffer(max_line)
        self._eof = False
        self.state = State.AWAIT_HELLO

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            self._lines.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Request | Rejected | Sentinel:
        """The next request (legal in the current state), a :class:`Rejected`, or a sentinel.

        Raises :class:`RemoteProtocolError` when the stream cannot go on (over-long line,
        or the peer closed in the middle of a line).
        """
        while True:
            line = self._lines.next_line()
            if line is None:
                if self._eof:
                    if self._lines.pending:
                        raise RemoteProtocolError(
                            ErrorCode.BAD_REQUEST, "connection closed in the middle of a line"
                        )
                    return CLOSED
                return NEED_DATA
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue  # blank lines are keep-alives
            req = decode_request(line)
            if isinstance(req, Rejected):
                return req
            op = op_of(req)
            if (self.state, op) not in TRANSITIONS:
                code, message = _illegal(self.state, op)
                return Rejected(req.id, code, message)
            return req

    def send_ok(self, request: Request, result: Result) -> bytes:
        """Bytes for a successful reply; moves the state as the table says."""
        key = (self.state, op_of(request))
        new_state = TRANSITIONS.get(key)
        if new_state is None:
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"cannot succeed {key[1]} in {key[0]}")
        expected = RESULT_TYPES[key[1]]
        if not isinstance(result, expected):
            raise LocalProtocolError(
                ErrorCode.INTERNAL, f"{key[1]} must answer {expected.__name__}"
            )
        self.state = new_state
        return encode_ok(request.id, result)

    def send_error(self, request_id: int | None, code: ErrorCode, message: str) -> bytes:
        return encode_error(request_id, code, message)

    def send_event(self, event: Event) -> bytes:
        if self.state is not State.AUTHENTICATED and not isinstance(event, ServerClosing):
            raise LocalProtocolError(ErrorCode.BAD_STATE, "events go to logged-in sessions only")
        return encode_event(event)


class ClientConnection:
    """The client's view: requests out, typed replies and events in.

    It remembers which op each outstanding request id was, so a reply's ``result`` decodes into
    that op's result type. The server is the authority on what is legal when; this end does not
    second-guess it (the tests rely on seeing the server's own errors).
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._lines = LineBuffer(max_line)
        self._eof = False
        self._pending: dict[int, str] = {}

    def send_request(self, request: Request) -> bytes:
        if request.id in self._pending:
            raise LocalProtocolError(ErrorCode.BAD_REQUEST, f"id {request.id} is in use")
        self._pending[request.id] = op_of(request)
        return encode_request(request)

    def forget(self, request_id: int) -> None:
        """Stop waiting for a reply (the caller gave up); a late reply is then dropped."""
        self._pending.pop(request_id, None)

    def receive_data(self, data: bytes | bytearray) -> None:
        if data:
            self._lines.feed(data)
        else:
            self._eof = True

    def next_event(self) -> ReplyOk | ReplyError | Event | Sentinel:
        while True:
            line = self._lines.next_line()
            if line is None:
                if self._eof:
                    return CLOSED
                return NEED_DATA
            if not line.strip():
                continue
            try:
                msg = _incoming_decoder.decode(line)
                if msg.event is not None:
                    event: Event = _event_decoder.decode(line)
                    return event
                if msg.ok is None:
                    raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "neither reply nor event")
                if not msg.ok:
                    if msg.error is None:
                        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "error reply, no error")
                    if msg.id is not None and self._pending.pop(msg.id, None) is None:
                        continue  # the caller gave up on it
                    return ReplyError(msg.id, msg.error.code, msg.error.message)
                if msg.id is None or not msg.result:
                    raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "ok reply without id/result")
                op = self._pending.pop(msg.id, None)
                if op is None:
                    continue
                result = msgspec.json.decode(msg.result, type=RESULT_TYPES[op])
                return ReplyOk(msg.id, op, result)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST, f"bad line from server: {exc}"
                ) from exc
