"""Keeping a flood of payment requests off a payee's terminal: each requester's burst of
requests (and cancellations) is shown as its first few lines, then one summary line.

Pure bookkeeping with an injected clock (the shell passes ``trio.current_time``); no I/O. The
server rate-limits making requests (p2ppay.limits.RequestLimit), but a person's terminal is
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

    def note(self, requester: str) -> bool:
        """An event from ``requester`` (a request made to us, or cancelled): True to show it."""
        now = self.clock()
        burst = self._bursts.pop(requester, None)
        if burst is None or now - burst.last_at >= BURST_QUIET:
            burst = _Burst(now)
        burst.last_at = now
        burst.seen += 1
        self._bursts[requester] = burst
        return burst.seen <= SHOWN_PER_BURST

    def due(self) -> float | None:
        """When the next burst ends (the clock's time), or None: no burst is going on."""
        first = next(iter(self._bursts.values()), None)
        return None if first is None else first.last_at + BURST_QUIET

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
            if hidden > 0:
                lines.append(
                    f"...and {hidden} more payment request events (made or cancelled) from "
                    f"{requester}; type requests to see those still open"
                )
        return lines
