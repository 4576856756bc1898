"""The course dialect, sans-I/O: chunks of bytes in, typed messages out; replies as bytes.

The classic socket-programming assignment's protocol (``REGISTER#name``, ``name#port``,
``List``, ``Exit``, ``payer#amount#payee``) comes in two flavours, each a :class:`Dialect`:

- :data:`REFERENCE` (the default): the course's later reference dialect. The login/List reply
  is balance, server key, count, then ``name#ip#port``; the *payee* forwards a transfer.
- :data:`SEED`: the older variant spoken by the course report p2ppay grew out of
  (``../shared/seed/part3-report.md``): ``210 FALL``/``220 AUTH_FALL`` (sic), ``DEPOSIT#``,
  ``Account Balance: ...`` blocks, registering logs in, a bare ``name`` asks where that payee
  listens (``On#ip#port``), and the *payer* settles.

Framing is the same for both, parsed exactly as the course's server does:

- A message ends at ``\\n`` or ``\\r\\n``. Many course clients send no line ending at all, one
  message per send, so a received chunk that ends without a line ending is one whole message.
- Trailing NUL bytes are ignored (some clients send their whole fixed-size buffer).
- A blank line (nothing but a line ending, or only NUL padding) is not a message: it gets no
  reply. Answering it would put an extra line in front of the reply to the client's next
  message, and clients read one reply per message.
- Every reply is one write ending in ``\\n``.

A dialect is data: its parser decides what a message *means* (each meaning is its own message
type, so a payee's forwarded transfer and a payer's payment are different events), and the
few replies both flavours share but spell differently are its fields. Nothing here does I/O:
the server's course session feeds chunks to :class:`CourseDecoder` and acts on the messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from p2ppay.wire import names
from p2ppay.wire.constraints import MAX_PORT, MIN_PORT, is_port

DEFAULT_MAX_MESSAGE: Final = 1024
#: names follow the native rule (p2ppay.names), and so compare regardless of letter case
NAME_RE: Final = names.NAME_RE
NUMBER_RE: Final = re.compile(r"[0-9]{1,18}")
#: a transfer's amount: a whole number, which the ledger refuses if it is not positive
AMOUNT_RE: Final = re.compile(r"-?[0-9]{1,18}")

# Replies both flavours send with the same words.
OK: Final = b"100 OK\n"
FORMAT_ERROR: Final = b"230 Input format error\n"
LOGIN_FIRST: Final = b"Please login first\n"
BYE: Final = b"Bye\n"

# The reference flavour's.
FAIL: Final = b"210 FAIL\n"
AUTH_FAIL: Final = b"220 AUTH_FAIL\n"
TRANSFER_OK: Final = b"Transfer OK!\n"
TRANSFER_FAIL: Final = b"Transfer Fail!\n"

# The seed flavour's, spelled as the report prints them.
SEED_FAIL: Final = b"210 FALL\n"
SEED_AUTH_FAIL: Final = b"220 AUTH_FALL\n"
DEPOSIT_OK: Final = b"DEPOSIT OK\n"
SUCCESSFUL: Final = b"Successful\n"
# The report never shows a failed deposit or payment; these are p2ppay's (see the README).
DEPOSIT_FAIL: Final = b"DEPOSIT FAIL\n"
PAY_NOT_YOURS: Final = b"Failed: not your account\n"
PAY_BAD_AMOUNT: Final = b"Failed: invalid amount\n"
PAY_NO_MONEY: Final = b"Failed: insufficient balance\n"
PAY_UNKNOWN_PAYEE: Final = b"Failed: unknown payee\n"
PAY_SELF: Final = b"Failed: cannot pay yourself\n"
PAY_BALANCE_LIMIT: Final = b"Failed: the payee's balance limit\n"
PAY_FAILED: Final = b"Failed\n"
# The payee lookup's answer when the payee is offline: the report shows only the online one
# (``On#<ip>#<port>``), and ``Off`` is its counterpart (see the README).
PAYEE_OFF: Final = b"Off\n"


@dataclass(frozen=True, slots=True)
class CourseRegister:
    """Reference: create the account (with ``deposit``, else the configured initial balance)."""

    name: str
    deposit: int | None  # the older REGISTER#name#deposit variant


@dataclass(frozen=True, slots=True)
class CourseSignUp:
    """Seed: create the account (balance 0) and log this connection in as it, at ``port``
    (None: the connection's own source port)."""

    name: str
    port: int | None


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
class CourseLookup:
    """Seed: a bare ``name``, the payer's question where its payee listens (before it pays)."""

    name: str


@dataclass(frozen=True, slots=True)
class CourseDeposit:
    """Seed: ``DEPOSIT#name#amount`` into the account this connection is logged in as."""

    name: str
    amount: int


@dataclass(frozen=True, slots=True)
class CourseTransfer:
    """Reference: the *payee* forwards what the payer sent it.

    ``amount`` None: the middle field is not a whole number. From the payee that is a failed
    transfer (the payer hears it); from anyone else it is no course message at all (230, as
    ``DEPOSIT#ray#500`` from a seed client is)."""

    payer: str
    amount: int | None
    payee: str


@dataclass(frozen=True, slots=True)
class CoursePayment:
    """Seed: the *payer* asks the server to move its own money.

    ``amount`` None: the middle field is not a whole number. From the payer that is a failed
    payment (an invalid amount); from anyone else it is no course message at all (230)."""

    payer: str
    amount: int | None
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
    """``REGISTER#...`` that cannot succeed (bad name, deposit or port): the dialect's 210."""

    why: str


@dataclass(frozen=True, slots=True)
class CourseBadDeposit:
    """Seed: ``DEPOSIT#...`` that cannot succeed (bad name or amount): ``DEPOSIT FAIL``."""

    why: str


CourseMessage: TypeAlias = (
    CourseRegister
    | CourseSignUp
    | CourseLogin
    | CourseList
    | CourseExit
    | CourseLookup
    | CourseDeposit
    | CourseTransfer
    | CoursePayment
    | CourseBadInput
    | CourseBadRegister
    | CourseBadDeposit
)


def _number(text: str) -> int | None:
    return int(text) if NUMBER_RE.fullmatch(text) else None


def _port(text: str) -> int | None:
    port = _number(text)
    return port if port is not None and is_port(port) else None


def _decode(raw: bytes) -> str | CourseBadInput:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return CourseBadInput(raw, "not UTF-8")


def _common(raw: bytes, parts: list[str]) -> CourseMessage | None:
    """What both flavours read alike: ``List``, ``Exit``, ``name#port``."""
    if parts == ["List"]:
        return CourseList()
    if parts == ["Exit"]:
        return CourseExit()
    if len(parts) == 2 and NAME_RE.fullmatch(parts[0]):
        port = _port(parts[1])
        if port is not None:
            return CourseLogin(parts[0], port)
        return CourseBadInput(raw, f"the port must be {MIN_PORT}-{MAX_PORT}")
    return None


def _money_move(parts: list[str]) -> tuple[str, int | None, str] | None:
    """``payer#amount#payee``: the amount any whole number (the ledger judges its value), or
    None when the middle field is not one (``1.5``, ``+5``, ``1e3``, twenty digits, a digit
    of another script, a word, nothing).

    A line of that shape is a money move whatever its middle field: real clients send the
    word their person typed as the amount, and their payer waits for the outcome like any
    other. Who may send it is the session's to judge (see :class:`CourseTransfer`)."""
    if len(parts) != 3 or not (NAME_RE.fullmatch(parts[0]) and NAME_RE.fullmatch(parts[2])):
        return None
    amount = int(parts[1]) if AMOUNT_RE.fullmatch(parts[1]) else None
    return parts[0], amount, parts[2]


def _fields(raw: bytes) -> list[str] | CourseBadInput:
    """A message's ``#``-separated fields (or why it is not text)."""
    text = _decode(raw)
    return text if isinstance(text, CourseBadInput) else text.split("#")


def _register_name(parts: list[str]) -> str | CourseBadRegister | None:
    """The name of a ``REGISTER#name[#x]`` message, why it cannot be one, or None if the
    message is not a register."""
    if parts[0] != "REGISTER" or len(parts) not in (2, 3):
        return None
    if not NAME_RE.fullmatch(parts[1]):
        return CourseBadRegister(f"invalid name {parts[1][:40]!r}")
    return parts[1]


def parse_message(raw: bytes) -> CourseMessage:
    """One reference-flavour message (without line ending or NUL padding)."""
    parts = _fields(raw)
    if isinstance(parts, CourseBadInput):
        return parts
    if (name := _register_name(parts)) is not None:
        if isinstance(name, CourseBadRegister) or len(parts) == 2:
            return name if isinstance(name, CourseBadRegister) else CourseRegister(name, None)
        deposit = _number(parts[2])
        if deposit is None:
            return CourseBadRegister(f"invalid deposit {parts[2][:40]!r}")
        return CourseRegister(name, deposit)
    if (common := _common(raw, parts)) is not None:
        return common
    if (move := _money_move(parts)) is not None:
        return CourseTransfer(*move)
    return CourseBadInput(raw, "not a course message")


def parse_seed_message(raw: bytes) -> CourseMessage:
    """One seed-flavour message (without line ending or NUL padding)."""
    parts = _fields(raw)
    if isinstance(parts, CourseBadInput):
        return parts
    if (name := _register_name(parts)) is not None:
        if isinstance(name, CourseBadRegister) or len(parts) == 2:
            return name if isinstance(name, CourseBadRegister) else CourseSignUp(name, None)
        port = _port(parts[2])  # a port in this flavour, not a deposit
        if port is None:
            return CourseBadRegister(f"invalid port {parts[2][:40]!r}")
        return CourseSignUp(name, port)
    if parts[0] == "DEPOSIT" and len(parts) == 3:
        if not NAME_RE.fullmatch(parts[1]):
            return CourseBadDeposit(f"invalid name {parts[1][:40]!r}")
        amount = _number(parts[2])
        if amount is None:
            return CourseBadDeposit(f"invalid amount {parts[2][:40]!r}")
        return CourseDeposit(parts[1], amount)
    if (common := _common(raw, parts)) is not None:
        return common
    # The report's client asks for its payee by name alone (its 4.b.i-ii: "send the payee to
    # the server, receive the payee's IP and port"; 五.2 shows "bill" answered On#...).
    if len(parts) == 1 and NAME_RE.fullmatch(parts[0]):
        return CourseLookup(parts[0])
    # The report's client (its figure 5) prefixes "Paid#"; its text shows it without.
    if len(parts) == 4 and parts[0] == "Paid":
        parts = parts[1:]
    if (move := _money_move(parts)) is not None:
        return CoursePayment(*move)
    return CourseBadInput(raw, "not a course message")


Online: TypeAlias = Sequence[tuple[str, str, int]]
"""Who is online, as ``(name, ip, port)``, in the order they came online."""


def encode_roster(balance: int, server_key: str, online: Iterable[tuple[str, str, int]]) -> bytes:
    """The login/List reply: balance, the server's public key, N, then N ``name#ip#port``."""
    users = list(online)
    lines = [str(balance), server_key, str(len(users))]
    lines += [f"{name}#{ip}#{port}" for name, ip, port in users]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _reference_roster(balance: int, server_key: str, online: Online) -> bytes:
    return encode_roster(balance, server_key, sorted(online))  # by name: names are unique


def encode_seed_roster(balance: int, online: Iterable[tuple[str, str, int]]) -> bytes:
    """The seed login/List reply, in the order given (the report lists who came online first
    first)."""
    users = list(online)
    lines = [
        f"Account Balance: {balance}",
        f"Online Clients: {len(users)}",
        "Online Clients Info:",
    ]
    lines += [f"{name}#{ip}#{port}" for name, ip, port in users]
    return ("\n".join(lines) + "\n").encode("utf-8")


def encode_payee_on(ip: str, port: int) -> bytes:
    """The seed payee lookup's answer for an online payee: where its client listens."""
    return f"On#{ip}#{port}\n".encode()


def _seed_roster(balance: int, server_key: str, online: Online) -> bytes:
    return encode_seed_roster(balance, online)  # this flavour names no key


@dataclass(frozen=True, slots=True)
class Dialect:
    """A flavour of the course dialect: how it reads a message, and the words it uses for the
    replies both flavours have. Replies to messages only one flavour has (``DEPOSIT OK``,
    ``Successful``, ``Transfer OK!``) need no field: only that flavour's parser makes them."""

    name: str
    parse: Callable[[bytes], CourseMessage]
    #: a REGISTER that fails (name taken or invalid)
    fail: bytes
    #: a login with an unknown name (or a native account's)
    auth_fail: bytes
    #: the login/List reply: (balance, server key, who is online in the order they came)
    roster: Callable[[int, str, Online], bytes]


REFERENCE: Final = Dialect("reference", parse_message, FAIL, AUTH_FAIL, _reference_roster)
SEED: Final = Dialect("seed", parse_seed_message, SEED_FAIL, SEED_AUTH_FAIL, _seed_roster)
DIALECTS: Final[dict[str, Dialect]] = {d.name: d for d in (REFERENCE, SEED)}


class CourseDecoder:
    """Splits received chunks into messages by the framing rules; ``parse`` (a dialect's)
    reads each one."""

    def __init__(
        self,
        max_message: int = DEFAULT_MAX_MESSAGE,
        parse: Callable[[bytes], CourseMessage] = parse_message,
    ) -> None:
        self.max_message = max_message
        self.parse = parse

    def receive_chunk(self, chunk: bytes | bytearray) -> list[CourseMessage]:
        """The messages in one received chunk; a chunk's unterminated tail is a message too."""
        out: list[CourseMessage] = []
        for piece in bytes(chunk).split(b"\n"):
            message = piece.rstrip(b"\x00").rstrip(b"\r").rstrip(b"\x00")
            if not message:
                continue  # a blank line, padding, or the nothing after a final newline
            if len(message) > self.max_message:
                out.append(
                    CourseBadInput(message[:64], f"longer than {self.max_message} bytes", True)
                )
                break
            out.append(self.parse(message))
        return out
