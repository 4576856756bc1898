"""A course-dialect connection: the classic assignment's protocol, answered byte for byte.

The :class:`~p2ppay.server.Server` owns the connection (limits, TLS, presence, shutdown); this
session reads chunks, lets :mod:`p2ppay.course` parse them, and acts on course accounts only.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import TYPE_CHECKING, Final, final

import trio

from . import course
from . import ledger as lg
from .course import (
    CourseBadInput,
    CourseBadRegister,
    CourseDecoder,
    CourseExit,
    CourseList,
    CourseLogin,
    CourseMessage,
    CourseRegister,
    CourseTransfer,
)
from .sending import Outgoing

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("p2ppay.server")


@final
class CourseSession:
    """One course-dialect connection. It acts on course accounts only and answers exactly as
    the course's server does (see p2ppay.course and the README)."""

    course: Final = True

    def __init__(self, server: Server, stream: trio.abc.Stream, ip: str) -> None:
        self.server = server
        self.stream = stream
        self.ip = ip
        self.decoder = CourseDecoder(server.config.course_max_message)
        self.user: str | None = None
        self.port: int | None = None
        self.cancel_scope = trio.CancelScope()
        self.receive_scope = trio.CancelScope()
        self._out = Outgoing(stream)

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                await self._serve()
        except trio.BrokenResourceError:
            log.info("%s: course connection lost", self.ip)
        except trio.ClosedResourceError:
            pass
        finally:
            self.server._forget(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _serve(self) -> None:
        cfg = self.server.config
        read_size = max(4096, cfg.course_max_message + 2)
        while not self.server.closing:
            # Not the native idle timeout: a menu-driven course client connects at start-up
            # and then waits for its person, who may take a while to choose "login".
            timeout = math.inf if self.user else cfg.course_idle_timeout
            data: bytes | bytearray | None = None
            self.receive_scope = trio.CancelScope()
            with trio.move_on_after(timeout) as idle, self.receive_scope:
                data = await self.stream.receive_some(read_size)
            if data is None:
                if idle.cancelled_caught:
                    self.server.limit_log.hit(
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

    async def send(self, data: bytes) -> None:
        """One reply in one write (course clients often read once per reply)."""
        with trio.move_on_after(self.server.config.write_timeout) as scope:
            await self._out.send(data)
        if scope.cancelled_caught:
            self.cancel_scope.cancel()

    async def _handle(self, message: CourseMessage) -> bool:
        """Answer one message; False ends the connection."""
        if isinstance(message, CourseBadInput):
            await self.send(course.FORMAT_ERROR)
            return not message.fatal
        if isinstance(message, CourseExit):
            await self.send(course.BYE)
            return False
        if isinstance(message, CourseBadRegister):
            await self.send(course.FAIL)
        elif isinstance(message, CourseRegister):
            await self.send(await self._register(message))
        elif isinstance(message, CourseLogin):
            await self.send(await self._login(message))
        elif isinstance(message, CourseList):
            await self.send(await self._roster() if self.user else course.LOGIN_FIRST)
        else:
            reply = await self._transfer(message)
            if reply is not None:
                await self.send(reply)
        return True

    async def _register(self, message: CourseRegister) -> bytes:
        cfg = self.server.config
        deposit = cfg.course_initial_balance if message.deposit is None else message.deposit
        try:
            await self.server.ledger.create_account(message.name, None, "course", deposit)
        except lg.LedgerError as exc:
            log.info("%s: course register %s failed: %s", self.ip, message.name, exc)
            return course.FAIL
        log.info("%s: registered course account %s", self.ip, message.name)
        return course.OK

    async def _login(self, message: CourseLogin) -> bytes:
        account = await self.server.ledger.account(message.name)
        if account is None or account.kind != "course":
            return course.AUTH_FAIL  # never a native account: they have passwords
        self.server._forget(self)
        old = self.server.course_online.get(message.name)
        if old is not None and old is not self:
            old.user = old.port = None  # taken over: the old connection is logged out
            log.info("%s: course user %s logged in again from %s", old.ip, message.name, self.ip)
        self.user, self.port = message.name, message.port
        self.server.course_online[message.name] = self
        return await self._roster()

    async def _roster(self) -> bytes:
        assert self.user is not None
        account = await self.server.ledger.account(self.user)
        balance = account.balance if account else 0
        online = [
            (name, s.ip, s.port or 0) for name, s in sorted(self.server.course_online.items())
        ]
        return course.encode_roster(balance, self.server.server_public_key, online)

    async def _transfer(self, message: CourseTransfer) -> bytes | None:
        # The dialect trusts the payee's word: the payee forwards what the payer sent it.
        # Only a sender logged in as the payee is heard; the ledger keeps course and native
        # accounts apart. A sender that is not the payee gets Transfer Fail! itself and the
        # payer hears nothing: a stranger must not put lines into the payer's connection.
        if self.user is None or self.user != message.payee:
            return course.TRANSFER_FAIL
        try:
            t = await self.server.ledger.settle(
                uuid.uuid4(), message.payer, message.payee, message.amount
            )
        except lg.LedgerError as exc:
            log.info("%s: course transfer %r failed: %s", self.ip, message, exc)
            outcome = course.TRANSFER_FAIL
        else:
            log.debug("%s: course transfer %s -> %s %d", self.ip, t.payer, t.payee, t.amount)
            outcome = course.TRANSFER_OK
        # Success or not, the outcome is the payer's, who waits for it; the payee is told
        # nothing (its client is not reading for a reply).
        payer = self.server.course_online.get(message.payer)
        if payer is self:
            return outcome  # paying oneself (refused): the answer in line, in order
        if payer is not None:

            async def tell_payer() -> None:
                try:
                    await payer.send(outcome)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            self.server.spawn(tell_payer)
        return None
