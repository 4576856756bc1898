"""Guards against guessing and floods: failed-login throttling, registration and request allowances.

Pure bookkeeping with an injected clock (the server passes ``trio.current_time``, so tests run
on Trio's mock clock); no I/O.

The login throttle is built so that nobody can lock an owner out from elsewhere: failures lock
one *(account, address)* pair, never the account, and an address's block does not stop the
accounts that have logged in from that address before. What stands against many addresses guessing
one account is the account's *guard* (docs/security.md, "Guessing"): past a number of failures
the account is on guard, and addresses it has never logged in from share one password check
per interval, while the addresses its owner has logged in from are not slowed at all.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar, final

from p2ppay.server.addresses import address_key
from p2ppay.settings import count, seconds, setting
from p2ppay.wire.names import name_key

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: How many names, (name, address) pairs and addresses the throttle remembers; the oldest are
#: forgotten first, so an attacker cycling through names cannot grow the server's memory
#: without bound.
MAX_TRACKED: Final = 100_000
#: How many addresses an account remembers having logged in from (the most recent ones).
KNOWN_ADDRESSES: Final = 8


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """How failed logins are counted; each field is also its command-line flag."""

    #: ...and every other address, the owner's included, is not affected
    max_account_failures: int = setting(
        20,
        "--login-failures",
        "failed logins in a row to one account from one address that lock that address out "
        "of that account (other addresses are not affected)",
        count,
    )
    account_lockout: float = setting(
        300.0, "--login-lockout", "seconds such an (account, address) lockout lasts", seconds
    )
    max_address_failures: int = setting(
        100,
        "--address-failures",
        "failed logins from one address that block it for --address-window (except for "
        "accounts that have logged in from it before)",
        count,
    )
    address_window: float = setting(
        300.0,
        "--address-window",
        "seconds over which an address's failed logins are counted",
        seconds,
    )
    guard_failures: int = setting(
        100,
        "--guard-failures",
        "failed logins to one account, from all addresses, within --guard-window that put it "
        "on guard: addresses it has not logged in from then share one check per "
        "--guard-interval",
        count,
    )
    guard_window: float = setting(
        300.0,
        "--guard-window",
        "seconds over which an account's failed logins are counted; on guard until this long "
        "passes without one",
        seconds,
    )
    guard_interval: float = setting(
        15.0,
        "--guard-interval",
        "seconds between password checks for an account on guard from addresses it has not "
        "logged in from",
        seconds,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a login may not be checked now, and for how long."""

    reason: str
    retry_after: float


@dataclass(slots=True)
class _Pair:
    failures: int = 0  # in a row
    locked_until: float = -math.inf


@dataclass(slots=True)
class _Account:
    window_start: float = -math.inf
    failures: int = 0
    guarded_until: float = -math.inf
    next_stranger_at: float = -math.inf
    known: OrderedDict[str, None] = field(default_factory=OrderedDict)


@dataclass(slots=True)
class _Address:
    window_start: float
    failures: int = 0


class LoginThrottle:
    """Counts failed logins per (account, address), per account and per source address.
    Accounts are keyed by their canonical name: "Alice" and "alice" share one count."""

    def __init__(self, config: ThrottleConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def admit(self, name: str, ip: str) -> Refusal | None:
        """None if a login to ``name`` from ``ip`` may be checked now (this takes the account's
        turn for new addresses when it is on guard); else why not, and for how long."""
        now = self.clock()
        name, address = name_key(name), address_key(ip)
        refusals = []
        pair = self._pairs.get((name, address))
        if pair is not None and pair.locked_until > now:
            refusals.append(
                Refusal(
                    "too many failed logins to this account from your address",
                    pair.locked_until - now,
                )
            )
        account = self._accounts.get(name)
        # An address's block is against guessing many accounts from it; it does not stop an
        # account that has logged in from this address before (a classroom behind one NAT, the
        # walk-through on 127.0.0.1): its owner is very likely here, and guessing at it from
        # here is still held to the per-(account, address) lockout above.
        known_here = account is not None and address in account.known
        source = self._addresses.get(address)
        if source is not None:
            end = source.window_start + self.config.address_window
            if end <= now:
                del self._addresses[address]
            elif source.failures >= self.config.max_address_failures and not known_here:
                refusals.append(Refusal("too many failed logins from your address", end - now))
        guarded = account if account and account.guarded_until > now else None
        if known_here:
            guarded = None  # an address the owner logged in from is never slowed
        if guarded is not None and guarded.next_stranger_at > now:
            refusals.append(
                Refusal(
                    "this account is being guessed at, so logins to it from addresses it has "
                    "not logged in from are slowed down",
                    guarded.next_stranger_at - now,
                )
            )
        if refusals:
            return max(refusals, key=lambda r: r.retry_after)
        if guarded is not None:  # this check is the new addresses' turn
            guarded.next_stranger_at = now + self.config.guard_interval
        return None

    def failed(self, name: str, ip: str) -> None:
        now = self.clock()
        cfg = self.config
        name, address = name_key(name), address_key(ip)
        pair = _remember(self._pairs, (name, address), _Pair)
        pair.failures += 1
        if pair.failures >= cfg.max_account_failures:
            pair.failures = 0
            pair.locked_until = now + cfg.account_lockout
        account = _remember(self._accounts, name, _Account)
        if account.guarded_until <= now and account.window_start + cfg.guard_window <= now:
            account.window_start, account.failures = now, 0
        account.failures += 1
        if account.guarded_until > now or account.failures >= cfg.guard_failures:
            account.guarded_until = now + cfg.guard_window
        source = self._addresses.get(address)
        if source is None or source.window_start + cfg.address_window <= now:
            source = _remember(self._addresses, address, lambda: _Address(now))
            source.window_start, source.failures = now, 0
        source.failures += 1

    def succeeded(self, name: str, ip: str) -> None:
        """The right password for ``name`` from ``ip``: that pair starts afresh, and the
        address becomes one the account knows (unslowed when the account is on guard). The
        account's own failure count stays: its owner logging in does not end an attack."""
        name, address = name_key(name), address_key(ip)
        self._pairs.pop((name, address), None)
        known = _remember(self._accounts, name, _Account).known
        known[address] = None
        known.move_to_end(address)
        if len(known) > KNOWN_ADDRESSES:
            known.popitem(last=False)

    def tracked(self) -> dict[str, int]:
        """How many (account, address) pairs, accounts and addresses are remembered."""
        return {
            "pairs": len(self._pairs),
            "accounts": len(self._accounts),
            "addresses": len(self._addresses),
        }

    def failures_in_a_row(self, name: str, ip: str) -> int:
        """Failed logins in a row to ``name`` from ``ip`` (0 after a lockout or a success)."""
        pair = self._pairs.get((name_key(name), address_key(ip)))
        return 0 if pair is None else pair.failures


def _remember(table: OrderedDict[K, T], key: K, make: Callable[[], T]) -> T:
    """``table[key]``, made if missing; the least recently used entry beyond MAX_TRACKED goes."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = make()
        if len(table) > MAX_TRACKED:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return entry


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """How many new accounts one address may make; each field is also its command-line flag.
    Generous by default: a classroom behind one NAT registers at once."""

    max_registrations_per_ip: int = setting(
        100,
        "--max-registrations-per-ip",
        "new accounts (either dialect) one address may make at once; the allowance comes back "
        "over --registration-window",
        count,
    )
    registration_window: float = setting(
        600.0,
        "--registration-window",
        "seconds in which a used-up --max-registrations-per-ip allowance comes back in full",
        seconds,
    )


@dataclass(slots=True)
class _Allowance:
    tokens: float
    at: float


class TokenBuckets(Generic[K]):
    """A token bucket per key: up to ``burst`` at once, refilled evenly over ``window``
    seconds (so a used-up allowance is back in full after ``window``). At most
    :data:`MAX_TRACKED` keys are remembered, the least recently used forgotten first (a
    forgotten key starts full again: the price of bounded memory)."""

    def __init__(self, burst: int, window: float, clock: Callable[[], float]) -> None:
        self.burst = float(burst)
        self.rate = burst / window
        self.clock = clock
        self._keys: OrderedDict[K, _Allowance] = OrderedDict()

    def take(self, key: K) -> float | None:
        """None if ``key`` may act now (this uses one of its allowance); else the seconds
        until it may."""
        now = self.clock()
        entry = _remember(self._keys, key, lambda: _Allowance(self.burst, now))
        entry.tokens = min(self.burst, entry.tokens + (now - entry.at) * self.rate)
        entry.at = now
        if entry.tokens < 1.0:
            return (1.0 - entry.tokens) / self.rate
        entry.tokens -= 1.0
        return None

    def refund(self, key: K) -> None:
        """Give back what :meth:`take` took: the act did not happen after all."""
        entry = self._keys.get(key)
        if entry is not None:
            entry.tokens = min(self.burst, entry.tokens + 1.0)

    def tracked(self) -> int:
        return len(self._keys)


class RegistrationLimit:
    """A token bucket per source address (IPv6 by /64, like the other per-address limits): up
    to ``max_registrations_per_ip`` at once, refilled evenly over ``registration_window``.
    Without it, account creation is bounded only by hashing (native) or not at all (course
    accounts, which also start with money): anyone could fill the ledger's disk."""

    def __init__(self, config: RegistrationConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._buckets: TokenBuckets[str] = TokenBuckets(
            config.max_registrations_per_ip, config.registration_window, clock
        )

    def admit(self, ip: str) -> float | None:
        """None if ``ip`` may register an account now (this uses one of its allowance); else
        the seconds until it may."""
        return self._buckets.take(address_key(ip))

    def refund(self, ip: str) -> None:
        """Give back what :meth:`admit` took: no account was made after all (its hash was
        refused, or another took the name first)."""
        self._buckets.refund(address_key(ip))

    def tracked(self) -> int:
        return self._buckets.tracked()


@dataclass(frozen=True, slots=True)
class RequestLimitConfig:
    """How fast payment requests may be made; each field is also its command-line flag.
    Counted per node (each node of a cluster keeps its own buckets)."""

    request_burst: int = setting(
        30,
        "--request-burst",
        "payment requests one account may make at once; the allowance comes back over "
        "--request-window",
        count,
    )
    request_window: float = setting(
        600.0,
        "--request-window",
        "seconds in which a used-up --request-burst allowance comes back in full",
        seconds,
    )
    request_pair_burst: int = setting(
        5,
        "--request-pair-burst",
        "payment requests one account may make to any one payer at once; the allowance "
        "comes back over --request-pair-window",
        count,
    )
    request_pair_window: float = setting(
        600.0,
        "--request-pair-window",
        "seconds in which a used-up --request-pair-burst allowance comes back in full",
        seconds,
    )


@final
class RequestLimit:
    """Token buckets for making payment requests: one per requester, one per (requester,
    payer) pair, both keyed by canonical names. The open-request caps (--max-open-requests)
    bound what is held at a time; these bound how fast requests are made, which the caps do
    not: a request cancelled at once frees its place, and each one still cost a ledger row
    and a line on the payer's terminal."""

    def __init__(self, config: RequestLimitConfig, clock: Callable[[], float]) -> None:
        self._requesters: TokenBuckets[str] = TokenBuckets(
            config.request_burst, config.request_window, clock
        )
        self._pairs: TokenBuckets[tuple[str, str]] = TokenBuckets(
            config.request_pair_burst, config.request_pair_window, clock
        )

    def admit(self, requester: str, payer: str) -> float | None:
        """None if ``requester`` may ask ``payer`` now (this uses one of both allowances);
        else the seconds until it may."""
        pair = (name_key(requester), name_key(payer))
        wait = self._requesters.take(pair[0])
        if wait is not None:
            return wait
        wait = self._pairs.take(pair)
        if wait is not None:
            self._requesters.refund(pair[0])  # nothing was made: the requester's turn back
        return wait

    def tracked(self) -> dict[str, int]:
        return {"requesters": self._requesters.tracked(), "pairs": self._pairs.tracked()}
