"""The two ends of a connection (:class:`ServerConnection`, :class:`ClientConnection`) and the
codecs they use: bytes in, typed events out; typed messages in, bytes out."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from p2ppay.wire.framing import (
    LineBuffer,
    check_max_depth,
    too_deep,
    too_deep_message,
)
from p2ppay.wire.messages import (
    CLOSED,
    NEED_DATA,
    OPS,
    RESULT_TYPES,
    ErrorBody,
    Event,
    PeerMessage,
    Rejected,
    ReplyError,
    ReplyOk,
    Request,
    Result,
    Sentinel,
    ServerClosing,
    op_of,
)
from p2ppay.wire.state import (
    TRANSITIONS,
    State,
    illegal,
)
from p2ppay.wire.vocabulary import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_LINE,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    dec_hook,
)

# --------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------

_request_decoder = msgspec.json.Decoder(Request, dec_hook=dec_hook)
_event_decoder = msgspec.json.Decoder(Event, dec_hook=dec_hook)
#: every event this client knows, by its ``event`` tag
EVENT_TAGS: Final = frozenset(str(t.__struct_config__.tag) for t in typing.get_args(Event))
_result_decoders: Final[Mapping[str, msgspec.json.Decoder[Any]]] = {
    op: msgspec.json.Decoder(t, dec_hook=dec_hook) for op, t in RESULT_TYPES.items()
}
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
    except RecursionError:  # callers check the depth first; a backstop all the same
        return Rejected(None, ErrorCode.BAD_REQUEST, "JSON nested too deep")
    if not isinstance(raw, dict):
        return Rejected(None, ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    rid = raw.get("id")
    req_id = rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else None
    op = raw.get("op")
    if isinstance(op, str) and op not in OPS:
        return Rejected(req_id, ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}")
    return Rejected(req_id, ErrorCode.BAD_REQUEST, str(exc))


def decode_request(line: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Request | Rejected:
    """Decode one request line (without its terminator)."""
    if too_deep(line, max_depth):
        return Rejected(None, ErrorCode.BAD_REQUEST, too_deep_message(max_depth))
    try:
        request: Request = _request_decoder.decode(line)
        return request
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _explain_bad_line(line, exc)
    except RecursionError:  # not with a sane max_depth; a backstop all the same
        return Rejected(None, ErrorCode.BAD_REQUEST, too_deep_message(max_depth))


def encode_request(request: Request) -> bytes:
    return _encoder.encode(request) + b"\n"


def encode_ok(request_id: int, result: Result) -> bytes:
    return _encoder.encode(_OkWire(request_id, result)) + b"\n"


def encode_error(request_id: int | None, code: ErrorCode | str, message: str) -> bytes:
    return _encoder.encode(_ErrWire(request_id, ErrorBody(str(code), message))) + b"\n"


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event) + b"\n"


def decode_event(line: bytes) -> Event:
    """One event line back (what another server node relays); ValueError if it is not one."""
    try:
        return _event_decoder.decode(line)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not an event: {exc}") from None


def encode_json(value: Any) -> bytes:
    """``value`` as JSON (no line end): a piece of a reply to cache (see ``send_ok_raw``)."""
    return _encoder.encode(value)


def list_result_json(balance: int, online: bytes) -> bytes:
    """A ``list`` result with its ``online`` array already encoded (``encode_json``): the same
    bytes as encoding ``ListResult(balance, online)``."""
    return b'{"balance":%d,"online":%s}' % (balance, online)


# --------------------------------------------------------------------------------------------
# The two ends of a connection
# --------------------------------------------------------------------------------------------


class _Lines:
    """What both ends share: received bytes split into bounded lines, and the peer's EOF."""

    def __init__(self, max_line: int, max_depth: int) -> None:
        check_max_depth(max_depth)
        self._lines = LineBuffer(max_line)
        self.max_depth = max_depth
        self._eof = False

    @property
    def partial(self) -> bool:
        """True while part of a line has been received but not its end (nor the stream's)."""
        return self._lines.pending > 0 and not self._eof

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            self._lines.feed(data)
        else:
            self._eof = True


class ServerConnection(_Lines):
    """The server's view of one native-protocol connection.

    Requests are handled one at a time: the server takes a request from :meth:`next_event`,
    answers it with :meth:`send_ok` or :meth:`send_error`, and only then takes the next one,
    so the state a request is checked against is the state its predecessors left.
    """

    def __init__(
        self, max_line: int = DEFAULT_MAX_LINE, max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        super().__init__(max_line, max_depth)
        self.state = State.AWAIT_HELLO

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
            req = decode_request(line, self.max_depth)
            if isinstance(req, Rejected):
                return req
            op = op_of(req)
            if (self.state, op) not in TRANSITIONS:
                code, message = illegal(self.state, op)
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

    def send_ok_raw(self, request: Request, result: bytes) -> bytes:
        """Like :meth:`send_ok` for a result already encoded as JSON (built from cached
        pieces); the caller vouches that it is the op's result type."""
        key = (self.state, op_of(request))
        new_state = TRANSITIONS.get(key)
        if new_state is None:
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"cannot succeed {key[1]} in {key[0]}")
        self.state = new_state
        return _encoder.encode(_OkWire(request.id, msgspec.Raw(result))) + b"\n"

    def send_error(self, request_id: int | None, code: ErrorCode, message: str) -> bytes:
        return encode_error(request_id, code, message)

    def send_event(self, event: Event) -> bytes:
        if self.state is not State.AUTHENTICATED and not isinstance(event, ServerClosing):
            raise LocalProtocolError(ErrorCode.BAD_STATE, "events go to logged-in sessions only")
        return encode_event(event)


class ClientConnection(_Lines):
    """The client's view: requests out, typed replies and events in.

    It remembers which op each outstanding request id was, so a reply's ``result`` decodes into
    that op's result type. The server is the authority on what is legal when; this end does not
    second-guess it (the tests rely on seeing the server's own errors).
    """

    def __init__(
        self, max_line: int = DEFAULT_MAX_LINE, max_depth: int = DEFAULT_MAX_DEPTH
    ) -> None:
        super().__init__(max_line, max_depth)
        self._pending: dict[int, str] = {}

    def send_request(self, request: Request) -> bytes:
        if request.id in self._pending:
            raise LocalProtocolError(ErrorCode.BAD_REQUEST, f"id {request.id} is in use")
        self._pending[request.id] = op_of(request)
        return encode_request(request)

    def forget(self, request_id: int) -> None:
        """Stop waiting for a reply (the caller gave up); a late reply is then dropped."""
        self._pending.pop(request_id, None)

    def next_event(self) -> ReplyOk | ReplyError | Event | Sentinel:
        while True:
            line = self._lines.next_line()
            if line is None:
                if self._eof:
                    return CLOSED
                return NEED_DATA
            if not line.strip():
                continue
            if too_deep(line, self.max_depth):
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"bad line from server: {too_deep_message(self.max_depth)}",
                )
            try:
                msg = _incoming_decoder.decode(line)
                if msg.event is not None:
                    if msg.event not in EVENT_TAGS:
                        continue  # an event from a newer server: clients ignore what they
                        # do not know (docs/protocol.md, 3)
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
                result = _result_decoders[op].decode(msg.result)
                return ReplyOk(msg.id, op, result)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST, f"bad line from server: {exc}"
                ) from exc
            except RecursionError:  # not with a sane max_depth; a backstop all the same
                raise RemoteProtocolError(
                    ErrorCode.BAD_REQUEST, "bad line from server: JSON nested too deep"
                ) from None


_peer_decoder = msgspec.json.Decoder(PeerMessage, dec_hook=dec_hook)


def decode_peer_message(line: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> PeerMessage:
    """Decode one peer line; raises :class:`RemoteProtocolError` with a clear message."""
    if too_deep(line, max_depth):
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, too_deep_message(max_depth))
    try:
        message: PeerMessage = _peer_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        explained = _explain_bad_line(line, exc)
        raise RemoteProtocolError(explained.code, explained.message) from None
    except RecursionError:  # not with a sane max_depth; a backstop all the same
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, too_deep_message(max_depth)) from None
    return message


def encode_peer_message(message: PeerMessage) -> bytes:
    return _encoder.encode(message) + b"\n"
