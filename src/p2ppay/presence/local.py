"""Who is online, where: one registry for both dialects, behind the :class:`Presence` interface.

A login *takes over* its name: an older session of the same account is told it was replaced
(its own state machine then refuses what only a current session may do) and logs out. The
in-process :class:`LocalPresence` serves one process; :mod:`.pg_presence` shares presence
between several server nodes on one PostgreSQL database, behind the same interface.

What crosses nodes goes through presence too, so that the sessions never ask which backend
they run on: a settled payment's event for the payee (:meth:`Presence.settled`) and a course
transfer's outcome for the payer (:meth:`Presence.tell_course`), a payment request's news
for the other party (:meth:`Presence.tell`).
"""

from __future__ import annotations

from typing import Protocol, final

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.wire.names import NameMap, name_key


class Member(Protocol):
    """What presence needs of a session."""

    @property
    def user(self) -> str | None:
        """The account it is logged in as (as registered), if any."""

    @property
    def ip(self) -> str: ...

    @property
    def listed_port(self) -> int | None:
        """The port it is listed with (where its payments are taken)."""

    def replaced(self, by_ip: str) -> None:
        """A newer login of the same account (from ``by_ip``) has taken over."""

    def paid(self, transfer: lg.Transfer) -> None:
        """A payment to this member's account has been settled (tell the client, best effort)."""

    def told(self, line: bytes) -> None:
        """Send the course client this line (a transfer's outcome), best effort."""

    def push(self, event: p.Event) -> None:
        """Send the native client this event (a payment request's news), best effort."""


class Presence(Protocol):
    """Who is online in each dialect. Keys are account names in any letter case."""

    #: moves on every change of who is online where (take_over, and forget of a current
    #: member), in either dialect: what was derived from an older value is stale
    generation: int

    def take_over(self, member: Member, *, course: bool = False) -> None: ...

    def forget(self, member: Member, *, course: bool = False) -> None: ...

    def is_current(self, member: Member, *, course: bool = False) -> bool: ...

    def local(self, name: str, *, course: bool = False) -> Member | None:
        """The session of ``name`` connected to this server process, if any."""

    async def published(self, member: Member, *, course: bool = False) -> None:
        """Return once ``member``'s login (a :meth:`take_over`) is seen by every lookup,
        wherever it is made: a login is answered only then."""

    async def lookup(self, name: str, *, course: bool = False) -> p.Presence | None:
        """Where a user takes payments, if online."""

    async def listing(self, limit: int) -> list[p.Presence]:
        """Native users online, by name, at most ``limit``."""

    async def course_roster(self) -> list[tuple[str, str, int]]:
        """Course users online as (name, ip, port), in the order they came online."""

    def settled(self, transfer: lg.Transfer) -> None:
        """``transfer`` was just settled by this process (new, not a replay): tell its payee,
        wherever the payee is online (a shared backend may do it from the ledger instead)."""

    def tell_course(self, name: str, line: bytes) -> None:
        """Send ``line`` to the course user ``name``, wherever it is online (best effort)."""

    def tell(self, name: str, event: p.Event) -> bool:
        """Send ``event`` to the native user ``name``, wherever it is online (best effort).
        True if it was online here and the event is on its way; False if it is not here
        (then another node may deliver it, but nobody here can know that it did)."""

    def names(self, *, course: bool = False) -> list[str]:
        """Who is online through this server process (as registered)."""


@final
class LocalPresence:
    """Presence in this process: one name map per dialect."""

    def __init__(self) -> None:
        self._native: NameMap[Member] = NameMap()
        self._course: NameMap[Member] = NameMap()
        self.generation = 0

    def _map(self, course: bool) -> NameMap[Member]:
        return self._course if course else self._native

    def take_over(self, member: Member, *, course: bool = False) -> None:
        assert member.user is not None
        online = self._map(course)
        # Re-inserted, not updated: the course roster lists users by when they came online.
        old = online.pop(member.user, None)
        online[member.user] = member
        self.generation += 1
        if old is not None and old is not member:
            old.replaced(member.ip)

    def forget(self, member: Member, *, course: bool = False) -> None:
        online = self._map(course)
        if member.user is not None and online.get(member.user) is member:
            del online[member.user]
            self.generation += 1

    def is_current(self, member: Member, *, course: bool = False) -> bool:
        return member.user is not None and self._map(course).get(member.user) is member

    def local(self, name: str, *, course: bool = False) -> Member | None:
        return self._map(course).get(name)

    async def published(self, member: Member, *, course: bool = False) -> None:
        """At once: this process is the only one."""

    async def lookup(self, name: str, *, course: bool = False) -> p.Presence | None:
        member = self._map(course).get(name)
        if member is None or member.user is None:
            return None
        return p.Presence(member.user, member.ip, member.listed_port)

    async def listing(self, limit: int) -> list[p.Presence]:
        members = sorted(self._native.values(), key=lambda m: name_key(m.user or ""))
        return [p.Presence(m.user or "", m.ip, m.listed_port) for m in members[:limit]]

    async def course_roster(self) -> list[tuple[str, str, int]]:
        return [(name, m.ip, m.listed_port or 0) for name, m in self._course.items()]

    def settled(self, transfer: lg.Transfer) -> None:
        payee = self._native.get(transfer.payee)
        if payee is not None:
            payee.paid(transfer)

    def tell_course(self, name: str, line: bytes) -> None:
        member = self._course.get(name)
        if member is not None:
            member.told(line)

    def tell(self, name: str, event: p.Event) -> bool:
        member = self._native.get(name)
        if member is None:
            return False
        member.push(event)
        return True

    def __len__(self) -> int:
        return len(self._native) + len(self._course)

    def names(self, *, course: bool = False) -> list[str]:
        return list(self._map(course))
