"""Proving who someone is: password hashing, login throttling, peer certificates, and checking
a payee's signed acceptance before a payment reaches the ledger.

Hashing runs on the hasher's own low-priority threads, fairly between addresses; a signature is
checked on a worker thread. Time comes from injected clocks (``clock`` for throttling, a wall
clock for certificate expiry), so tests run on Trio's mock clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar, final

import trio
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.logs import LimitLog
from p2ppay.passwords import hash_password, verify_password
from p2ppay.pki import (
    IdentityError,
    Issuer,
    PeerCertificate,
    load_public_key_der,
    public_key_der,
    verify_acceptance,
)
from p2ppay.server.addresses import address_key
from p2ppay.server.config import ServerConfig
from p2ppay.server.errors import RequestFailed
from p2ppay.server.hashing import Hasher, HashQueueFull, Work
from p2ppay.server.throttle import LoginThrottle, Refusal, RegistrationLimit
from p2ppay.wire.names import NameMap

log = logging.getLogger("p2ppay.server")

T = TypeVar("T")


@final
class Accounts:
    """Passwords, throttling, certificates and acceptance checks for one server."""

    def __init__(
        self,
        ledger: lg.Ledger,
        issuer: Issuer,
        config: ServerConfig,
        limit_log: LimitLog,
        *,
        hash_work: Work | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.issuer = issuer
        self.config = config
        self.limit_log = limit_log
        self.wall_clock = wall_clock
        self.throttle = LoginThrottle(config.throttle, clock)
        self.registrations = RegistrationLimit(config.registrations, clock)
        # name -> (public key, expiry in ms) certified for the account's current session, or
        # None once revoked; a cache of what the ledger stores, set before every change of a
        # key is written (so no settle checked after the change uses the old key) and filled
        # from the ledger on first use.
        self._peer_keys: NameMap[tuple[EllipticCurvePublicKey, int, bytes] | None] = NameMap()
        # Checking a signature takes ~65 us of CPU (the GIL released): off the event loop, in
        # batches like the ledger's commits (one thread hop for all the checks waiting, not
        # one each: a hop costs more than the check).
        self._checks_in, self._checks = trio.open_memory_channel[_Check](math.inf)
        self._hash_work = hash_work  # tests: what runs a hash job instead of the threads
        self._hasher: Hasher | None = None  # its threads run while running() does
        # A hash to check against when the account does not exist, so that a missing account
        # costs the same time as a wrong password. Made lazily (it is slow).
        self._dummy_hash: str | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The hashing threads, and the signature checker, run while this block does."""
        cfg = self.config
        async with (
            Hasher(cfg.hash_threads, cfg.hash_queue_per_address, work=self._hash_work) as hasher,
            trio.open_nursery() as nursery,
        ):
            self._hasher = hasher
            nursery.start_soon(self._check_signatures)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    async def _check_signatures(self) -> None:
        """Check every signature waiting, in one worker-thread call per batch."""
        async for first in self._checks:
            batch = [first]
            while True:
                try:
                    batch.append(self._checks.receive_nowait())
                except trio.WouldBlock:
                    break
            await trio.to_thread.run_sync(_run_checks, batch)
            for check in batch:
                check.done.set()

    @property
    def hasher(self) -> Hasher:
        assert self._hasher is not None, "running() runs the hashing threads"
        return self._hasher

    def hash_jobs_waiting(self) -> int:
        """Password checks waiting for a hashing thread (0 while the threads do not run)."""
        return 0 if self._hasher is None else self._hasher.waiting()

    # -- passwords --

    async def _hash_job(self, ip: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a hashing thread in ``ip``'s turn; a full queue is ``rate_limited``."""
        try:
            return await self.hasher.run(address_key(ip), fn)
        except HashQueueFull:
            self.limit_log.hit("hash-queue-per-address", f"{ip} has too many logins waiting")
            raise RequestFailed(
                p.ErrorCode.RATE_LIMITED,
                "too many logins from your address are waiting to be checked; try again in 1 s",
            ) from None

    async def hash_password(self, password: str, ip: str) -> str:
        digest: str = await self._hash_job(ip, partial(hash_password, password, self.config.scrypt))
        return digest

    async def verify_password(self, password: str, stored: str | None, ip: str) -> bool:
        """Whether ``password`` matches ``stored``; with no stored hash (no such account) it
        costs the same and answers False."""
        if stored is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash_password("no such account", ip)
            await self._hash_job(ip, partial(verify_password, password, self._dummy_hash))
            return False
        ok: bool = await self._hash_job(ip, partial(verify_password, password, stored))
        return ok

    @contextmanager
    def registering(self, ip: str) -> Iterator[None]:
        """Around making a new account from ``ip`` (both dialects): one of the address's
        allowance is used, or ``rate_limited`` is raised at once. If the block fails (the
        hash queue was full, the name was taken meanwhile) no account was made, and the
        allowance is given back; not when it is cancelled, as the account may yet be
        committed."""
        wait = self.registrations.admit(ip)
        if wait is not None:
            self.limit_log.hit("registrations-per-ip", f"{ip} made too many new accounts")
            raise RequestFailed(
                p.ErrorCode.RATE_LIMITED,
                f"too many new accounts from your address; try again in {math.ceil(wait)} s",
            )
        try:
            yield
        except Exception:
            self.registrations.refund(ip)
            raise

    async def check_login(self, name: str, password: str, ip: str) -> lg.Account:
        """The account ``name`` if ``password`` is its own; else ``rate_limited`` or the one
        answer for a missing account and a wrong password, ``auth_failed``."""
        refusal: Refusal | None = self.throttle.admit(name, ip)
        if refusal is not None:
            self.limit_log.hit("login-throttle", f"{name} from {ip}")
            raise RequestFailed(
                p.ErrorCode.RATE_LIMITED,
                f"{refusal.reason}; try again in {math.ceil(refusal.retry_after)} s",
            )
        account = await self.ledger.account(name)
        stored = account.password_hash if account and account.kind == "native" else None
        # A missing account costs the same hashing as a wrong password, and gets the same
        # answer: a login does not tell whether a name exists.
        ok = await self.verify_password(password, stored, ip)
        if account is None or stored is None or not ok:
            self.throttle.failed(name, ip)
            raise RequestFailed(p.ErrorCode.AUTH_FAILED, "unknown user or wrong password")
        self.throttle.succeeded(name, ip)
        return account

    # -- peer certificates --

    async def certify(self, account: lg.Account, csr: str | None) -> PeerCertificate | None:
        """Issue ``account`` a peer certificate for the CSR's key, which becomes its current
        key; without a CSR, the account has no current key any more. Either way no earlier
        session's key is accepted from now on.

        That is all a login must write, and only when the key changes: a client logging in
        again with the key it has (the wallet reconnecting) gets a certificate that ends when
        the stored one does, and nothing is written (so it can log in while the ledger
        cannot write: a full disk)."""
        name = account.name
        if csr is None:
            await self.revoke_peer_key(name)
            return None
        lifetime = dt.timedelta(seconds=self.config.peer_cert_lifetime)
        try:
            cert = self.issuer.issue(csr, name, lifetime)
        except IdentityError as exc:
            raise RequestFailed(p.ErrorCode.BAD_CSR, str(exc)) from None
        der = public_key_der(cert.public_key)
        kept = self._kept_key_until(account) if der == account.peer_key else None
        if kept is not None:  # the current key already: until it expires, nothing to write
            return self.issuer.issue(csr, name, lifetime, until=kept)
        expires_ms = int(cert.not_after.timestamp() * 1000)
        await self._set_peer_key(name, (cert.public_key, expires_ms, der))
        return cert

    def _kept_key_until(self, account: lg.Account) -> dt.datetime | None:
        """When the account's stored key expires, if a login with that same key may keep
        it as it is: it has not expired, and no change of it is on its way to the ledger
        (the cache, set before every write, agrees with what the account read said)."""
        stored, expires_ms = account.peer_key, account.peer_key_expires_ms
        if stored is None or expires_ms is None or expires_ms <= self.wall_clock() * 1000:
            return None
        if account.name in self._peer_keys:
            cached = self._peer_keys[account.name]
            if cached is None or cached[2] != stored or cached[1] != expires_ms:
                return None
        return dt.datetime.fromtimestamp(expires_ms / 1000, dt.UTC)

    async def best_effort(self, what: str, work: Awaitable[T], fallback: T) -> T:
        """``work``'s result, or ``fallback`` if the ledger cannot do it just now (logged
        once a minute, with a count, as ``what``): for what a login records, not what it
        needs."""
        try:
            return await work
        except lg.LedgerUnavailable as exc:
            self.limit_log.failed(f"ledger {what}", f"ledger failure on {what} (skipped): {exc}")
            return fallback

    async def revoke_peer_key(self, name: str) -> None:
        """Acceptances signed with ``name``'s current key no longer settle (logout)."""
        if name in self._peer_keys and self._peer_keys[name] is None:
            return  # no current key already (a login without a CSR, say): no ledger write
        await self._set_peer_key(name, None)

    def forget_peer_key(self, name: str) -> None:
        """Drop what this process knows of ``name``'s key (another node logged it in with a new
        one): the next check reads the ledger. Never unsafe: the ledger settles only with the
        key it holds."""
        self._peer_keys.pop(name, None)

    async def _set_peer_key(
        self, name: str, entry: tuple[EllipticCurvePublicKey, int, bytes] | None
    ) -> None:
        # The cache changes first, with no checkpoint before the ledger write is queued: a
        # settle checked before this point was queued to the ledger before the write, and
        # every settle checked after it sees the new entry.
        self._peer_keys[name] = entry
        try:
            await self.ledger.set_peer_key(name, *(entry[2], entry[1]) if entry else (None, None))
        except BaseException:
            self._peer_keys.pop(name, None)  # the ledger says what holds; read it again
            raise

    async def check_acceptance(
        self,
        payment_id: uuid.UUID,
        payer: str,
        payee: str,
        amount: int,
        acceptance: str,
        memo: str | None = None,
    ) -> bytes:
        """The payee's current key (DER) if ``acceptance`` is the payee's signature over this
        very payment, made with the key certified for the payee's current session; else
        ``bad_acceptance`` (or ``b""`` for a payee with no native account, which the ledger
        then refuses). The signature is checked on a worker thread; the ledger then
        settles only if that key is still the payee's (see ``Ledger.settle``)."""
        if payee in self._peer_keys:
            cached = self._peer_keys[payee]
        else:
            account = await self.ledger.account(payee)
            if account is None or account.kind != "native":
                # No such payee, or one that cannot be paid natively: the ledger says so
                # (unknown_payee). b"" matches no key, should such a payee appear meanwhile.
                return b""
            stored = None
            if account.peer_key is not None:
                expires = account.peer_key_expires_ms or 0
                stored = (load_public_key_der(account.peer_key), expires, account.peer_key)
            # A key changed while we read wins over what we read.
            cached = self._peer_keys.setdefault(account.name, stored)
        if cached is None:
            raise _refused(f"{payee} has no current peer key to accept with")
        key, expires_ms, der = cached
        if expires_ms < self.wall_clock() * 1000:
            raise _refused(f"{payee}'s certificate has expired")
        try:
            signature = base64.b64decode(acceptance, validate=True)
        except ValueError:
            raise _refused("the acceptance is not base64") from None
        check = _Check(
            partial(verify_acceptance, key, signature, str(payment_id), payer, payee, amount, memo)
        )
        self._checks_in.send_nowait(check)
        await check.done.wait()
        if not check.good:
            raise _refused(f"the acceptance is not {payee}'s signature over this payment")
        return der


class _Check:
    """One signature to check, and its verdict."""

    __slots__ = ("done", "good", "verify")

    def __init__(self, verify: Callable[[], bool]) -> None:
        self.verify = verify
        self.done = trio.Event()
        self.good = False


def _run_checks(batch: list[_Check]) -> None:
    for check in batch:
        try:
            check.good = check.verify()
        except Exception:  # a signature that cannot even be parsed is no good
            check.good = False


def _refused(why: str) -> RequestFailed:
    return RequestFailed(p.ErrorCode.BAD_ACCEPTANCE, why)
