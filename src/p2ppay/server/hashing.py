"""Password hashing on dedicated low-priority threads, shared fairly between addresses.

scrypt releases the GIL, so hashing in threads keeps the event loop free; but on a small
machine the hashing threads still compete with the event loop for the CPU, and the scheduler
then delays the loop by whole time slices. Our own threads (not Trio's shared thread cache,
whose threads also run the ledger) can lower their scheduling priority for good. They belong
to the :class:`Hasher`, which starts them and joins them: no orphan threads.

Fairness: a hash job waits in its address's queue, never in one first-come queue shared by
all, so one address's storm of guesses cannot make everyone else wait behind it. Each queue
is bounded (overflow is refused at once with :class:`HashQueueFull`), and a job is handed to a
thread only when one is free, so nothing piles up where it could not be taken back.
"""

from __future__ import annotations

import heapq
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar, final

import outcome
import trio

T = TypeVar("T")

#: How much lower than the event loop hashing threads run (Linux ``nice`` steps).
NICENESS: Final = 10

#: What runs one hash job: by default, one of the Hasher's threads. Tests pass their own (a
#: coroutine that decides when the "hash" is done) so that they need no real scrypt and no
#: wall-clock time.
Work = Callable[[Callable[[], Any]], Awaitable[Any]]

_STOP: Final = object()


class HashQueueFull(Exception):
    """The caller's address already has as many hash jobs waiting as it may."""


#: How many addresses the hasher remembers serving; the least recently served are forgotten
#: first (and then count as never served, which is where they were in the order anyway).
MAX_REMEMBERED: Final = 100_000


@dataclass(eq=False, slots=True)
class _Job:
    fn: Callable[[], Any]
    key: str
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


@dataclass(eq=False, slots=True)
class _Queue:
    jobs: deque[_Job] = field(default_factory=deque)
    entry: int = 0  # the sequence number of this key's live entry in the heap


@final
class Hasher:
    """Runs blocking hash jobs, ``threads`` at a time, fairly between keys (addresses).

    Use as an async context. The next job to run is the oldest waiting one of the key that
    was served least recently: keys with work waiting take turns (round robin), and a key
    that has not been served for a while, or never (a quiet client among storming ones),
    goes first. Each key may have ``max_waiting`` jobs waiting (running ones do not count).
    """

    def __init__(self, threads: int, max_waiting: int = 32, *, work: Work | None = None) -> None:
        if threads < 1:
            raise ValueError("at least one hashing thread")
        if max_waiting < 1:
            raise ValueError("at least one waiting job per address")
        self.threads = threads
        self.max_waiting = max_waiting
        self._work: Work = work or self._in_thread
        self._queues: dict[str, _Queue] = {}  # only keys with jobs waiting
        self._waiting = 0
        # One entry per key with jobs waiting: (when last served, arrival, key); entries of
        # keys whose jobs were all withdrawn go stale and are skipped.
        self._heap: list[tuple[int, int, str]] = []
        self._served: OrderedDict[str, int] = OrderedDict()  # key -> dispatch number
        self._dispatched = 0
        self._arrivals = 0
        self._idle_workers = trio.lowlevel.ParkingLot()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = (
            [
                threading.Thread(target=self._thread, name=f"p2ppay-hash-{i}", daemon=True)
                for i in range(threads)
            ]
            if work is None
            else []
        )
        self._stack = AsyncExitStack()

    # -- lifecycle --

    async def __aenter__(self) -> Hasher:
        for thread in self._threads:
            thread.start()
        self._stack.push_async_callback(self._stop_threads)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)  # runs first: workers stop
        for _ in range(self.threads):
            nursery.start_soon(self._worker)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # The exception goes through, so that the workers' nursery sees what its body raised.
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _stop_threads(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            await trio.to_thread.run_sync(thread.join)

    # -- callers --

    def waiting(self, key: str | None = None) -> int:
        """How many jobs wait (for ``key``, or for all keys)."""
        if key is None:
            return self._waiting
        q = self._queues.get(key)
        return len(q.jobs) if q else 0

    async def run(self, key: str, fn: Callable[[], T]) -> T:
        """``fn()`` on a hashing thread, in ``key``'s turn; its result (or exception) here.

        Raises :class:`HashQueueFull` at once if ``key`` has ``max_waiting`` jobs waiting. A
        caller cancelled while its job waits takes the job back (nothing is computed); once
        the job runs it is finished anyway, and holds its thread until then."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
            self._enter(key, q)
        elif len(q.jobs) >= self.max_waiting:
            raise HashQueueFull(key)
        job = _Job(fn, key)
        q.jobs.append(job)
        self._waiting += 1
        self._idle_workers.unpark()
        try:
            await job.done.wait()
        finally:
            if job.result is None:
                self._withdraw(job)
        assert job.result is not None
        result: T = job.result.unwrap()
        return result

    def _enter(self, key: str, q: _Queue) -> None:
        self._arrivals += 1
        q.entry = self._arrivals
        heapq.heappush(self._heap, (self._served.get(key, -1), q.entry, key))
        if len(self._heap) > 2 * len(self._queues) + 64:  # mostly stale: rebuild
            self._heap = [e for e in self._heap if self._live(e)]
            heapq.heapify(self._heap)

    def _live(self, entry: tuple[int, int, str]) -> bool:
        q = self._queues.get(entry[2])
        return q is not None and q.entry == entry[1]

    def _withdraw(self, job: _Job) -> None:
        q = self._queues.get(job.key)
        if q is not None and job in q.jobs:
            q.jobs.remove(job)
            self._waiting -= 1
            if not q.jobs:
                del self._queues[job.key]  # its heap entry is now stale

    def _next_job(self) -> _Job | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not self._live(entry):
                continue
            key = entry[2]
            q = self._queues[key]
            job = q.jobs.popleft()
            self._waiting -= 1
            self._dispatched += 1
            self._served[key] = self._dispatched
            self._served.move_to_end(key)
            if len(self._served) > MAX_REMEMBERED:
                self._served.popitem(last=False)
            if q.jobs:
                self._enter(key, q)  # back in line, behind every key served before it
            else:
                del self._queues[key]
            return job
        return None

    # -- workers: one task per thread, so a job leaves its queue only when a thread is free --

    async def _worker(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                await self._idle_workers.park()
                continue
            try:
                job.result = outcome.Value(await self._work(job.fn))
            except Exception as exc:  # the caller's to see (Cancelled ends the worker)
                job.result = outcome.Error(exc)
            job.done.set()

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        abandoned = False

        def deliver(result: outcome.Outcome[Any]) -> None:
            if not abandoned:
                trio.lowlevel.reschedule(task, outcome.Value(result))

        def abort(_: Any) -> trio.lowlevel.Abort:
            # Only at shutdown (workers are cancelled then): the job still runs; its result
            # is dropped.
            nonlocal abandoned
            abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        self._jobs.put((fn, token, deliver))
        result: outcome.Outcome[Any] = await trio.lowlevel.wait_task_rescheduled(abort)
        return result.unwrap()

    def _thread(self) -> None:
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
