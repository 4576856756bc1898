"""The value rules every layer shares, declared once: amounts, ports, history size. (Names have
their own module, :mod:`p2ppay.names`.) The wire protocol, the course dialect, the ledger and
the shell all import from here. No I/O."""

from __future__ import annotations

from typing import Final

#: The largest amount anything can carry at all. The server's configured limits are lower; this
#: bound only keeps every sum far away from SQLite's 64-bit integer range.
MAX_AMOUNT: Final = 10**15

#: Where a client may take payments (and a course client may say it listens): no privileged port.
MIN_PORT: Final = 1024
MAX_PORT: Final = 65535

#: The most movements one history request returns.
MAX_HISTORY: Final = 1000

#: How many events (pushed by the server, or a wallet's own) a client buffers before dropping.
EVENT_BUFFER: Final = 1000


def is_amount(value: object) -> bool:
    """A positive whole number within :data:`MAX_AMOUNT` (never a bool or a float)."""
    return type(value) is int and 1 <= value <= MAX_AMOUNT


def is_port(value: int) -> bool:
    return MIN_PORT <= value <= MAX_PORT


#: The longest memo a payment or a payment request may carry, in characters (code points).
MAX_MEMO: Final = 140


def is_memo(value: object) -> bool:
    """A memo: 1 to :data:`MAX_MEMO` characters, every one printable (no control or format
    characters: no newline, escape, bidirectional override, lone surrogate). So the signed
    bytes can end a memo with a newline unambiguously, and a memo needs no escaping to be shown
    (it is escaped anyway, see ``terminal.printable``)."""
    return isinstance(value, str) and 1 <= len(value) <= MAX_MEMO and value.isprintable()


def memo_problem(value: str) -> str | None:
    """Why ``value`` cannot be a memo (one line), or None if it can."""
    if not value:
        return "a memo cannot be empty"
    if len(value) > MAX_MEMO:
        return f"a memo is at most {MAX_MEMO} characters (this one has {len(value)})"
    if not value.isprintable():
        return "a memo cannot contain control characters (newlines, escapes, ...)"
    return None


#: Units of a duration (``10m``, ``2h``, ``30s``, ``7d``), in seconds.
DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``text``: a whole number followed by s, m, h or d (``10m``, ``2h``).
    Raises ValueError with a one-line reason."""
    text = text.strip().lower()
    unit = DURATION_UNITS.get(text[-1:]) if text else None
    digits = text[:-1]
    if unit is None or not digits.isascii() or not digits.isdigit() or len(digits) > 9:
        raise ValueError(
            f"a duration is a whole number and a unit s, m, h or d, like 10m (not {text!r})"
        )
    seconds = int(digits) * unit
    if seconds < 1:
        raise ValueError("a duration must be at least 1 s")
    return seconds
