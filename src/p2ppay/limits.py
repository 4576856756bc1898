"""Guards against guessing and floods: failed-login throttling, and logging a limit only once.

Pure bookkeeping with an injected clock (the server passes ``trio.current_time``, so tests run
on Trio's mock clock); no I/O.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

T = TypeVar("T")

#: How many names and addresses the throttle remembers; the oldest are forgotten first, so an
#: attacker cycling through names cannot grow the server's memory without bound.
MAX_TRACKED: Final = 100_000


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    #: this many failed logins in a row lock the account's logins...
    max_account_failures: int = 20
    #: ...for this many seconds (the right password does not help meanwhile)
    account_lockout: float = 300.0
    #: this many failed logins from one address within ``address_window`` seconds block that
    #: address's logins until the window ends
    max_address_failures: int = 100
    address_window: float = 300.0


@dataclass(slots=True)
class _Account:
    failures: int = 0
    locked_until: float = -math.inf


@dataclass(slots=True)
class _Address:
    window_start: float
    failures: int = 0


class LoginThrottle:
    """Counts failed logins per account name and per source address."""

    def __init__(self, config: ThrottleConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def retry_after(self, name: str, address: str) -> float | None:
        """Seconds until ``name`` may try to log in from ``address``, or None if it may now."""
        now = self.clock()
        waits = []
        account = self._accounts.get(name)
        if account is not None and account.locked_until > now:
            waits.append(account.locked_until - now)
        source = self._addresses.get(address)
        if source is not None:
            end = source.window_start + self.config.address_window
            if end <= now:
                del self._addresses[address]
            elif source.failures >= self.config.max_address_failures:
                waits.append(end - now)
        return max(waits) if waits else None

    def failed(self, name: str, address: str) -> None:
        now = self.clock()
        account = self._remember(self._accounts, name, _Account)
        account.failures += 1
        if account.failures >= self.config.max_account_failures:
            account.failures = 0
            account.locked_until = now + self.config.account_lockout
        source = self._addresses.get(address)
        if source is None or source.window_start + self.config.address_window <= now:
            source = self._remember(self._addresses, address, lambda: _Address(now))
            source.window_start, source.failures = now, 0
        source.failures += 1

    def succeeded(self, name: str) -> None:
        self._accounts.pop(name, None)

    @staticmethod
    def _remember(table: OrderedDict[str, T], key: str, make: Callable[[], T]) -> T:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = make()
            if len(table) > MAX_TRACKED:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return entry


class LimitLog:
    """Logs that a limit was hit once, then at most once per ``interval`` with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def hit(self, limit: str, detail: str) -> None:
        now = time.monotonic()
        last = self._last.get(limit)
        if last is not None and now - last < self.interval:
            self._suppressed[limit] = self._suppressed.get(limit, 0) + 1
            return
        self._last[limit] = now
        more = self._suppressed.pop(limit, 0)
        suffix = f" (and {more} more since the last report)" if more else ""
        self.logger.warning("limit %s: %s%s", limit, detail, suffix)
