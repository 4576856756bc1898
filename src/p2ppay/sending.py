"""Writes to one stream, one message at a time: the cheap replacement for a lock around
``send_all`` (SSLStream refuses two at once; replies and pushed events share a stream).

``trio.Lock`` yields to the scheduler twice on every acquisition even when nobody else wants
it; at one reply and one event per payment that showed in the server's profile. Uncontended,
:meth:`Outgoing.send` adds no scheduling of its own (``send_all`` checkpoints anyway).
"""

from __future__ import annotations

from typing import final

import trio


@final
class Outgoing:
    def __init__(self, stream: trio.abc.SendStream) -> None:
        self.stream = stream
        self.busy = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def send(self, data: bytes) -> None:
        """Write ``data`` after any write already under way (in the order they came)."""
        while self.busy:
            await self._waiting.park()
        self.busy = True
        try:
            await self.stream.send_all(data)
        finally:
            self.busy = False
            self._waiting.unpark()
