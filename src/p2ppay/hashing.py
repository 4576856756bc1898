"""Password hashing on dedicated low-priority threads, so a login storm never slows the others.

scrypt releases the GIL, so hashing in threads keeps the event loop free; but on a small
machine the hashing threads still compete with the event loop for the CPU, and the scheduler
then delays the loop by whole time slices. Our own threads (not Trio's shared thread cache,
whose threads also run the ledger) can lower their scheduling priority for good. They belong
to the :class:`Hasher`, which starts them and joins them: no orphan threads.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, final

import outcome
import trio

#: How much lower than the event loop hashing threads run (Linux ``nice`` steps).
NICENESS: Final = 10

_STOP: Final = object()


@final
class Hasher:
    """Runs blocking hash jobs on ``threads`` dedicated threads; use as an async context."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("at least one hashing thread")
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"p2ppay-hash-{i}", daemon=True)
            for i in range(threads)
        ]

    async def __aenter__(self) -> Hasher:
        for thread in self._threads:
            thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            await trio.to_thread.run_sync(thread.join)

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: hash at normal priority
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, token, deliver = job
            result = outcome.capture(fn)
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:
                return

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a hashing thread; its result (or exception) here."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        abandoned = False

        def deliver(result: outcome.Outcome[Any]) -> None:
            if not abandoned:
                trio.lowlevel.reschedule(task, outcome.Value(result))

        def abort(_: Any) -> trio.lowlevel.Abort:
            nonlocal abandoned
            abandoned = True  # the job still runs; its result is dropped
            return trio.lowlevel.Abort.SUCCEEDED

        self._jobs.put((fn, token, deliver))
        result: outcome.Outcome[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        return result.unwrap()
