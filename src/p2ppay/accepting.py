"""An accept loop that waits out a full file table instead of filling the log.

``trio.serve_listeners`` logs every EMFILE (and ENFILE, ENOBUFS, ENOMEM) from ``accept`` at
ERROR with a traceback and tries again 0.1 s later: ten traceback lines a second per listener
for as long as the process has no descriptor to spare, which a flood of connections can make
last. :class:`PatientListener` wraps a listener so that ``accept`` itself waits and retries,
saying so in one line at most once a minute (through a :class:`~p2ppay.server.throttle.LimitLog`);
the connections meanwhile wait in the kernel's queue, and are taken once some close.
"""

from __future__ import annotations

import errno
import os
from typing import Final, TypeVar, final

import trio

from p2ppay.logs import LimitLog

StreamT = TypeVar("StreamT", bound=trio.abc.AsyncResource)

#: accept failed for want of a resource that comes back when connections close
#: (the same list as trio's own serve_listeners)
OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: as long as trio's serve_listeners waits: short enough that a freed descriptor is soon used
PAUSE: Final = 0.1


@final
class PatientListener(trio.abc.Listener[StreamT]):
    """``inner``, except that running out of descriptors or memory in ``accept`` is waited out
    (logged as the limit ``open-files``, with ``advice`` on what to change)."""

    def __init__(self, inner: trio.abc.Listener[StreamT], limit_log: LimitLog, advice: str) -> None:
        self.inner = inner
        self.limit_log = limit_log
        self.advice = advice

    async def accept(self) -> StreamT:
        while True:
            try:
                return await self.inner.accept()
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise
                code = errno.errorcode[exc.errno]
                self.limit_log.hit(
                    "open-files",
                    f"cannot accept connections: {os.strerror(exc.errno).lower()} ({code}); "
                    f"they wait until some close ({self.advice})",
                )
            await trio.sleep(PAUSE)

    async def aclose(self) -> None:
        await self.inner.aclose()
