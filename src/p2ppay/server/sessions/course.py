"""A course-dialect connection: the classic assignment's protocol, answered byte for byte.

The server owns the connection (limits, TLS, presence, shutdown); this session reads chunks,
lets :mod:`p2ppay.course` parse them with the server's
:class:`~p2ppay.course.Dialect`, and acts on course accounts only. Each kind of message has
one handler; the dialect's parser decides which kinds a connection can send (only the seed
flavour's parser makes a ``CourseDeposit``, a ``CourseLookup`` or a ``CoursePayment``, only
the reference flavour's a ``CourseTransfer``), so no handler asks which flavour it serves.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import ClassVar, Final, assert_never, final

import trio

from p2ppay import ledger as lg
from p2ppay.server import listing
from p2ppay.server.errors import RequestFailed
from p2ppay.server.sessions.base import Host, SessionBase
from p2ppay.wire import course
from p2ppay.wire.course import (
    CourseBadDeposit,
    CourseBadInput,
    CourseBadRegister,
    CourseDecoder,
    CourseDeposit,
    CourseExit,
    CourseList,
    CourseLogin,
    CourseLookup,
    CourseMessage,
    CoursePayment,
    CourseRegister,
    CourseSignUp,
    CourseTransfer,
)
from p2ppay.wire.names import name_key

log = logging.getLogger("p2ppay.server")

#: the seed flavour's answer to a payment the ledger refused, by the ledger's reason
_PAYMENT_REFUSALS: Final[dict[type[lg.LedgerError], bytes]] = {
    lg.AmountOutOfRange: course.PAY_BAD_AMOUNT,
    lg.InsufficientFunds: course.PAY_NO_MONEY,
    lg.UnknownPayee: course.PAY_UNKNOWN_PAYEE,
    lg.SelfPayment: course.PAY_SELF,
    lg.BalanceLimit: course.PAY_BALANCE_LIMIT,
}


@final
class CourseSession(SessionBase):
    """One course-dialect connection. It acts on course accounts only and answers exactly as
    the course's server does (see p2ppay.course and the README)."""

    course: ClassVar[bool] = True

    def __init__(self, host: Host, stream: trio.abc.Stream, ip: str, port: int = 0) -> None:
        super().__init__(host, stream, ip)
        #: the connection's source port (0 if unknown): the seed flavour's REGISTER#name uses it
        self.peer_port = port
        self.dialect = host.course_dialect
        self.decoder = CourseDecoder(host.config.course_max_message, self.dialect.parse)
        self.port: int | None = None
        #: whether this connection has ever been logged in (then it is not a new connection
        #: any more, and the seed flavour's same-address rule does not apply to it)
        self.was_online = False

    @property
    def listed_port(self) -> int | None:
        return self.port

    def replaced(self, by_ip: str) -> None:
        # Taken over: this connection is logged out, silently (course clients expect nothing).
        log.info("%s: course user %s logged in again from %s", self.ip, self.user, by_ip)
        self.user = self.port = None

    async def serve(self) -> None:
        cfg = self.host.config
        if cfg.course_greeting is not None:  # once, before anything is read (and after TLS)
            await self.send(cfg.course_greeting.encode() + b"\n")
        read_size = max(4096, cfg.course_max_message + 2)
        while not self.host.closing:
            # Not the native idle timeout: a menu-driven course client connects at start-up
            # and then waits for its person, who may take a while to choose "login".
            timeout = math.inf if self.user else cfg.course_idle_timeout
            data: bytes | bytearray | None = None
            self.receive_scope = trio.CancelScope()
            with trio.move_on_after(timeout) as idle, self.receive_scope:
                data = await self.stream.receive_some(read_size)
            if data is None:
                if idle.cancelled_caught:
                    self.host.limit_log.hit(
                        "course-idle-timeout",
                        f"{self.ip}: course connection silent for {timeout:.0f} s, closed",
                    )
                    return
                continue  # woken for shutdown
            if not data:
                return  # the client hung up: that logs it out
            for message in self.decoder.receive_chunk(data):
                log.debug("%s: course %s: %r", self.ip, self.user or "-", message)
                if not await self._handle(message):
                    return

    async def _handle(self, message: CourseMessage) -> bool:
        """Answer one message; False ends the connection."""
        reply: bytes | None
        match message:
            case CourseBadInput(fatal=fatal):
                await self.send(course.FORMAT_ERROR)
                return not fatal
            case CourseExit():
                await self.send(course.BYE)
                return False
            case CourseBadRegister():
                reply = self.dialect.fail
            case CourseRegister():
                reply = await self._register(message)
            case CourseSignUp():
                reply = await self._sign_up(message)
            case CourseLogin():
                reply = await self._login(message)
            case CourseList():
                reply = await self._roster() if self.user else course.LOGIN_FIRST
            case CourseLookup():
                reply = await self._lookup(message) if self.user else course.LOGIN_FIRST
            case CourseBadDeposit():
                reply = course.DEPOSIT_FAIL
            case CourseDeposit():
                reply = await self._deposit(message)
            case CoursePayment():
                reply = await self._pay(message)
            case CourseTransfer():
                reply = await self._transfer(message)
            case _:
                assert_never(message)  # mypy: every kind of message has its handler
        if reply is not None:
            await self.send(reply)
        return True

    # -- accounts and presence --

    async def _create(self, name: str, deposit: int) -> bool:
        if await self.host.ledger.account(name) is not None:
            return False  # taken (and so no new account: none of the allowance is used)
        try:
            with self.host.accounts.registering(self.ip):
                await self.host.ledger.create_account(name, None, "course", deposit)
        except RequestFailed as exc:  # (logged once a minute by the limit log, not each time)
            log.debug("%s: course register %s refused: %s", self.ip, name, exc.message)
            return False
        except lg.LedgerError as exc:
            log.info("%s: course register %s failed: %s", self.ip, name, exc)
            return False
        log.info("%s: registered course account %s", self.ip, name)
        return True

    async def _register(self, message: CourseRegister) -> bytes:
        cfg = self.host.config
        deposit = cfg.course_initial_balance if message.deposit is None else message.deposit
        if cfg.deposits == "operator":  # money comes only from the operator: start empty
            if message.deposit:
                return self.dialect.fail
            deposit = 0
        return course.OK if await self._create(message.name, deposit) else self.dialect.fail

    async def _sign_up(self, message: CourseSignUp) -> bytes:
        # The seed flavour: a new account starts empty (its client deposits next), and the
        # connection that registered it is online as it at once.
        if not await self._create(message.name, 0):
            return self.dialect.fail
        self._go_online(message.name, message.port or self.peer_port)
        await self.host.accounts.best_effort(
            "login record", self.host.ledger.record_login(message.name), None
        )
        await self.host.presence.published(self, course=True)
        return course.OK

    async def _login(self, message: CourseLogin) -> bytes:
        account = await self.host.ledger.account(message.name)
        if account is None or account.kind != "course":
            return self.dialect.auth_fail  # never a native account: they have passwords
        self._go_online(account.name, message.port)  # shown as registered
        # (bookkeeping: a ledger that cannot write still lets the user in to see the roster)
        await self.host.accounts.best_effort(
            "login record", self.host.ledger.record_login(account.name), None
        )
        await self.host.presence.published(self, course=True)  # (found on every node now)
        return await self._roster()

    def _go_online(self, name: str, port: int) -> None:
        """Make this connection ``name``'s, at ``port``; an older one is logged out."""
        presence = self.host.presence
        presence.forget(self, course=True)
        self.user, self.port = name, port
        self.was_online = True
        presence.take_over(self, course=True)

    async def _roster(self) -> bytes:
        assert self.user is not None
        balance = await self.host.ledger.balance(self.user) or 0
        presence, dialect, key = self.host.presence, self.dialect, self.host.server_public_key
        # Both flavours' replies are a first line with the balance, then who is online: that
        # part is encoded once per change of presence.
        cache_key = ("course", dialect.name, key)
        online = listing.get(presence, cache_key)
        if online is None:

            async def build() -> bytes:
                return dialect.roster(0, key, await presence.course_roster()).split(b"\n", 1)[1]

            online = await listing.cached(presence, cache_key, build)
        first = dialect.roster(balance, key, ()).split(b"\n", 1)[0]
        return first + b"\n" + online

    async def _lookup(self, message: CourseLookup) -> bytes:
        """The seed flavour's payee lookup: where ``name`` listens, if it is online."""
        # Who is online, as a native lookup reads it (with a PostgreSQL ledger: every node's
        # users, a miss asked of the database), then a ledger read only for a name nobody is
        # online as.
        where = await self.host.presence.lookup(message.name, course=True)
        if where is not None:
            return course.encode_payee_on(where.ip, where.port or 0)
        account = await self.host.ledger.account(message.name)
        if account is None or account.kind != "course":
            return course.PAY_UNKNOWN_PAYEE  # the words of a payment to such a payee
        return course.PAYEE_OFF

    # -- money --

    async def _deposit(self, message: CourseDeposit) -> bytes:
        # Only into the account this connection is logged in as (always a course account).
        if self.user is None or name_key(self.user) != name_key(message.name):
            return course.DEPOSIT_FAIL
        if self.host.config.deposits == "operator":
            return course.DEPOSIT_FAIL
        try:
            await self.host.ledger.deposit(message.name, message.amount)
        except lg.LedgerError as exc:
            log.info("%s: course deposit %r failed: %s", self.ip, message, exc)
            return course.DEPOSIT_FAIL
        return course.DEPOSIT_OK

    def _speaks_for(self, payer: str) -> bool:
        """Whether this connection may move ``payer``'s money (the seed flavour's rule).

        A logged-in connection speaks for its own account only. A new connection (one that
        has never logged in) speaks for an account online from the same IP: the report's
        client settles on a fresh connection. That trusts the network address, as the
        report's server did; the README says so."""
        if self.user is not None:
            return name_key(self.user) == name_key(payer)
        if self.was_online:
            return False  # logged out by a newer login: it speaks for nobody now
        session = self.host.presence.local(payer, course=True)
        return session is not None and session.ip == self.ip

    async def _move(
        self, what: str, message: CoursePayment | CourseTransfer, amount: int
    ) -> lg.Transfer | lg.LedgerError:
        """Move a course payment's money (a fresh payment id: the dialect has none); the
        ledger's refusal, if it refuses."""
        try:
            t = await self.host.ledger.settle(uuid.uuid4(), message.payer, message.payee, amount)
        except lg.LedgerError as exc:
            log.info("%s: course %s %r failed: %s", self.ip, what, message, exc)
            return exc
        log.debug("%s: course %s %s -> %s %d", self.ip, what, t.payer, t.payee, t.amount)
        return t

    async def _pay(self, message: CoursePayment) -> bytes:
        if not self._speaks_for(message.payer):
            if message.amount is None:  # not a payment this sender could make: no message
                return course.FORMAT_ERROR
            log.info("%s: course payment %r refused: not the payer's", self.ip, message)
            return course.PAY_NOT_YOURS
        if message.amount is None:
            log.info("%s: course payment %r refused: not a whole amount", self.ip, message)
            return course.PAY_BAD_AMOUNT
        moved = await self._move("payment", message, message.amount)
        if isinstance(moved, lg.LedgerError):
            return _PAYMENT_REFUSALS.get(type(moved), course.PAY_FAILED)
        return course.SUCCESSFUL  # settle() returns once the transfer is committed

    async def _transfer(self, message: CourseTransfer) -> bytes | None:
        # The reference flavour trusts the payee's word: the payee forwards what the payer
        # sent it. Only a sender logged in as the payee is heard; the ledger keeps course and
        # native accounts apart. A sender that is not the payee gets Transfer Fail! itself and
        # the payer hears nothing: a stranger must not put lines into the payer's connection.
        # (Unless its middle field is no amount at all: then the line is no transfer of the
        # sender's, just no course message, e.g. a seed client's DEPOSIT#ray#500.)
        if self.user is None or name_key(self.user) != name_key(message.payee):
            return course.TRANSFER_FAIL if message.amount is not None else course.FORMAT_ERROR
        if message.amount is None:
            # The payee forwarded what its person typed as the amount (a word, say): the
            # payer waits for this transfer's outcome like any other's.
            log.info("%s: course transfer %r refused: not a whole amount", self.ip, message)
            outcome = course.TRANSFER_FAIL
        else:
            moved = await self._move("transfer", message, message.amount)
            failed = isinstance(moved, lg.LedgerError)
            outcome = course.TRANSFER_FAIL if failed else course.TRANSFER_OK
        # Success or not, the outcome is the payer's, who waits for it; the payee is told
        # nothing (its client is not reading for a reply).
        presence = self.host.presence
        if presence.local(message.payer, course=True) is self:
            return outcome  # paying oneself (refused): the answer in line, in order
        presence.tell_course(message.payer, outcome)  # on whichever node the payer is
        return None
