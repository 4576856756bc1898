"""The course dialect, sans-I/O: chunks of bytes in, typed messages out; replies as bytes.

The classic socket-programming assignment's protocol (``REGISTER#name``, ``name#port``,
``List``, ``Exit``, ``payer#amount#payee``), parsed exactly as the course's server does:

- A message ends at ``\\n`` or ``\\r\\n``. Many course clients send no line ending at all, one
  message per send, so a received chunk that ends without a line ending is one whole message.
- Trailing NUL bytes are ignored (some clients send their whole fixed-size buffer).
- Every reply is one write ending in ``\\n``.

No trio, no sockets: the server's course session feeds chunks to :class:`CourseDecoder`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from . import names

DEFAULT_MAX_MESSAGE: Final = 1024
#: names follow the native rule (p2ppay.names), and so compare regardless of letter case
NAME_RE: Final = names.NAME_RE
NUMBER_RE: Final = re.compile(r"[0-9]{1,18}")

OK: Final = b"100 OK\n"
FAIL: Final = b"210 FAIL\n"
AUTH_FAIL: Final = b"220 AUTH_FAIL\n"
FORMAT_ERROR: Final = b"230 Input format error\n"
LOGIN_FIRST: Final = b"Please login first\n"
BYE: Final = b"Bye\n"
TRANSFER_OK: Final = b"Transfer OK!\n"
TRANSFER_FAIL: Final = b"Transfer Fail!\n"


@dataclass(frozen=True, slots=True)
class CourseRegister:
    name: str
    deposit: int | None  # the older REGISTER#name#deposit variant


@dataclass(frozen=True, slots=True)
class CourseLogin:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class CourseList:
    pass


@dataclass(frozen=True, slots=True)
class CourseExit:
    pass


@dataclass(frozen=True, slots=True)
class CourseTransfer:
    payer: str
    amount: int
    payee: str


@dataclass(frozen=True, slots=True)
class CourseBadInput:
    """Anything else: answered with ``230 Input format error``. After a ``fatal`` one (a
    message over the length limit) the connection is closed: the stream cannot be trusted."""

    raw: bytes
    why: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class CourseBadRegister:
    """``REGISTER#...`` that cannot succeed (bad name or deposit): ``210 FAIL``."""

    why: str


CourseMessage: TypeAlias = (
    CourseRegister
    | CourseLogin
    | CourseList
    | CourseExit
    | CourseTransfer
    | CourseBadInput
    | CourseBadRegister
)


def _number(text: str) -> int | None:
    return int(text) if NUMBER_RE.fullmatch(text) else None


def parse_message(raw: bytes) -> CourseMessage:
    """One message (without line ending or NUL padding)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return CourseBadInput(raw, "not UTF-8")
    if text == "List":
        return CourseList()
    if text == "Exit":
        return CourseExit()
    parts = text.split("#")
    if parts[0] == "REGISTER" and len(parts) in (2, 3):
        name = parts[1]
        if not NAME_RE.fullmatch(name):
            return CourseBadRegister(f"invalid name {name[:40]!r}")
        if len(parts) == 2:
            return CourseRegister(name, None)
        deposit = _number(parts[2])
        if deposit is None:
            return CourseBadRegister(f"invalid deposit {parts[2][:40]!r}")
        return CourseRegister(name, deposit)
    if len(parts) == 2 and NAME_RE.fullmatch(parts[0]):
        port = _number(parts[1])
        if port is not None and 1024 <= port <= 65535:
            return CourseLogin(parts[0], port)
        return CourseBadInput(raw, "the port must be 1024-65535")
    if len(parts) == 3 and NAME_RE.fullmatch(parts[0]) and NAME_RE.fullmatch(parts[2]):
        amount = _number(parts[1])
        if amount is not None:
            return CourseTransfer(parts[0], amount, parts[2])
    return CourseBadInput(raw, "not a course message")


class CourseDecoder:
    """Splits received chunks into messages by the dialect's rules."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message

    def receive_chunk(self, chunk: bytes | bytearray) -> list[CourseMessage]:
        """The messages in one received chunk; a chunk's unterminated tail is a message too."""
        out: list[CourseMessage] = []
        for piece in bytes(chunk).split(b"\n"):
            message = piece.rstrip(b"\x00").rstrip(b"\r").rstrip(b"\x00")
            if not message:
                continue  # an empty line, padding, or the nothing after a final newline
            if len(message) > self.max_message:
                out.append(
                    CourseBadInput(message[:64], f"longer than {self.max_message} bytes", True)
                )
                break
            out.append(parse_message(message))
        return out


def encode_roster(balance: int, server_key: str, online: Iterable[tuple[str, str, int]]) -> bytes:
    """The login/List reply: balance, the server's public key, N, then N ``name#ip#port``."""
    users = list(online)
    lines = [str(balance), server_key, str(len(users))]
    lines += [f"{name}#{ip}#{port}" for name, ip, port in users]
    return ("\n".join(lines) + "\n").encode("utf-8")
