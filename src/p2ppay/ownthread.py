"""A thread of a component's own, owned by a Trio task: for a loop that lives as long as its
owner and waits in real time (the PostgreSQL watchdog, the SQLite ledger's file watcher)."""

from __future__ import annotations

from collections.abc import Callable

import outcome
import trio


async def run_in_own_thread(fn: Callable[[], None], *, name: str) -> None:
    """Run ``fn`` in a new thread and return once it has returned (its error is raised here).

    Hard choice: neither ``trio.to_thread`` nor a Trio timer. A thread from Trio's cache that
    lives as long as its owner keeps ``trio.testing``'s ``active_thread_count`` above 0 and
    ``wait_all_threads_completed`` from returning; and a timer is a deadline that a test's
    autojump clock jumps to whenever every task waits for a thread (a hash, a commit), so the
    tests' own timeouts would trip in "no time". Shielded: the owner ends ``fn`` with ``fn``'s
    own stop signal (a ``threading.Event``, say), and this waits for it to have ended."""
    token = trio.lowlevel.current_trio_token()
    ended = trio.Event()
    result: list[outcome.Outcome[None]] = []

    def deliver(result_: outcome.Outcome[None]) -> None:
        result.append(result_)
        token.run_sync_soon(ended.set)

    trio.lowlevel.start_thread_soon(fn, deliver, name=name)
    with trio.CancelScope(shield=True):
        await ended.wait()
    result[0].unwrap()


__all__ = ["run_in_own_thread"]
