"""Keeping a flood of payment requests off a payee's terminal: each requester's burst of
requests (and cancellations) is shown as its first few lines, then one summary line; and a
crowd of requesters at once (many accounts, each within its own allowance) is shown as its
first lines, then one line for the whole crowd.

Pure bookkeeping with an injected clock (the shell passes ``trio.current_time``); no I/O. The
server rate-limits making requests (p2ppay.server.throttle.RequestLimit), but a person's terminal is
worth guarding on its own: the limits are per node, and a lot of lines scrolls a real payment's
line out of sight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

#: A requester quiet for this long has ended its burst (its summary is then due). A constant,
#: not a flag: it shapes what a person sees, not what anybody may do.
BURST_QUIET: Final = 5.0
#: Lines of one burst shown in full before the rest are only counted.
SHOWN_PER_BURST: Final = 2
#: Lines (events and burst summaries, from everyone) of one crowd shown before the rest are
#: only counted; a crowd ends when no requester has been heard for :data:`BURST_QUIET`.
SHOWN_PER_CROWD: Final = 10
#: Requesters whose bursts are tracked at once (each a few bytes; beyond it the oldest
#: burst is summarised early).
MAX_BURSTS: Final = 1000


@dataclass(slots=True)
class _Burst:
    last_at: float
    seen: int = 0


@final
class RequestBurst:
    """Per requester: :meth:`note` says whether an event's line is shown; once the requester
    has been quiet for :data:`BURST_QUIET`, :meth:`summaries` gives one line saying how many
    were not (if any)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._bursts: dict[str, _Burst] = {}  # in order of their last event
        #: the crowd going on: when it was last heard, lines it showed, what it did not
        self._crowd_at: float | None = None
        self._crowd_shown = 0
        self._crowd_hidden = 0
        self._crowd_from: set[str] = set()

    def _crowded(self, requester: str, hidden: int) -> bool:
        """Whether the crowd has shown its lines; if so ``hidden`` more are counted in it."""
        if self._crowd_shown < SHOWN_PER_CROWD:
            self._crowd_shown += 1
            return False
        self._crowd_hidden += hidden
        if len(self._crowd_from) < MAX_BURSTS:
            self._crowd_from.add(requester)
        return True

    def note(self, requester: str) -> bool:
        """An event from ``requester`` (a request made to us, or cancelled): True to show it."""
        now = self.clock()
        burst = self._bursts.pop(requester, None)
        if burst is None or now - burst.last_at >= BURST_QUIET:
            burst = _Burst(now)
        burst.last_at = now
        burst.seen += 1
        self._bursts[requester] = burst
        if self._crowd_at is None or now - self._crowd_at >= BURST_QUIET:
            self._end_crowd()
        self._crowd_at = now
        if burst.seen > SHOWN_PER_BURST:
            return False  # (counted in the burst's summary)
        if self._crowded(requester, 1):
            burst.seen -= 1  # (counted in the crowd's instead)
            return False
        return True

    def _end_crowd(self) -> str | None:
        """The crowd's summary line, if it hid anything; a new crowd starts."""
        line = None
        if self._crowd_hidden:
            accounts = len(self._crowd_from)
            line = (
                f"...and {self._crowd_hidden} more payment request events (made or cancelled) "
                f"from {accounts} account{'s' if accounts != 1 else ''}; type requests to see "
                "those still open"
            )
        self._crowd_at = None
        self._crowd_shown = self._crowd_hidden = 0
        self._crowd_from = set()
        return line

    def due(self) -> float | None:
        """When the next burst (or a crowd that hid lines) ends (the clock's time), or None:
        none is going on."""
        first = next(iter(self._bursts.values()), None)
        times = [] if first is None else [first.last_at + BURST_QUIET]
        if self._crowd_hidden and self._crowd_at is not None:
            times.append(self._crowd_at + BURST_QUIET)
        return min(times, default=None)

    def summaries(self, *, flush: bool = False) -> list[str]:
        """One line for each burst that has ended (every burst, with ``flush``) and had lines
        that were not shown; those bursts are forgotten."""
        now = self.clock()
        lines = []
        for requester, burst in list(self._bursts.items()):
            ended = now - burst.last_at >= BURST_QUIET or len(self._bursts) > MAX_BURSTS
            if not (ended or flush):
                break  # (in order of their last event: the rest are newer)
            del self._bursts[requester]
            hidden = burst.seen - SHOWN_PER_BURST
            if hidden > 0 and not self._crowded(requester, hidden):
                lines.append(
                    f"...and {hidden} more payment request events (made or cancelled) from "
                    f"{requester}; type requests to see those still open"
                )
        crowd_over = self._crowd_at is not None and now - self._crowd_at >= BURST_QUIET
        if crowd_over or flush:
            line = self._end_crowd()
            if line is not None:
                lines.append(line)
        return lines
