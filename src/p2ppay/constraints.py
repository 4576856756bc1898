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
