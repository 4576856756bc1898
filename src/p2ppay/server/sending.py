"""Writes to one stream: bytes are queued, and whoever flushes writes everything pending in one
``send_all`` (SSLStream refuses two at once; replies and pushed events share a stream).

A pushed event (another session's payment) is only *queued*; the reply the session is about to
send, or one delivery task per burst, carries it out in the same TLS record and system call.
A write per event, each in a task of its own with a timeout scope of its own, was the
largest single item of the server's profile per payment (issue 12). No lock: ``trio.Lock``
yields to the scheduler twice on every acquisition even when nobody else wants it.
"""

from __future__ import annotations

from typing import final

import trio


@final
class Outgoing:
    def __init__(self, stream: trio.abc.SendStream) -> None:
        self.stream = stream
        #: a write is under way
        self.busy = False
        self._pending: list[bytes] = []  # chunks: one is written as it is, several joined
        self._queued = 0  # bytes ever queued
        self._written = 0  # bytes ever handed to send_all and written
        self._waiting = trio.lowlevel.ParkingLot()
        #: a write failed or was cancelled: the stream's state is unknown, nothing more goes
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes queued and not yet being written."""
        return sum(map(len, self._pending))

    def queue(self, data: bytes) -> bool:
        """Queue ``data`` after everything queued before; True if nobody is writing now (then
        the caller must see that :meth:`flush` runs), False if the write under way will
        carry it too."""
        self._pending.append(data)
        self._queued += len(data)
        return not self.busy

    async def send(self, data: bytes) -> None:
        """Queue ``data`` and return once it (and everything queued before it) is written."""
        self.queue(data)
        await self.flush()

    async def flush(self) -> None:
        """Write everything queued so far (and whatever is queued while writing). If another
        task is writing, wait until it has written what was queued when this was called."""
        target = self._queued
        while self.busy:
            if self._written >= target:
                return
            await self._waiting.park()
        if self._written >= target:
            return
        if self._broken:
            raise trio.BrokenResourceError("an earlier write to this stream failed")
        self.busy = True
        try:
            while self._pending:
                chunks = self._pending
                self._pending = []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                await self.stream.send_all(data)
                self._written += len(data)
        except BaseException:
            self._broken = True
            self._pending.clear()
            raise
        finally:
            self.busy = False
            self._waiting.unpark_all()
