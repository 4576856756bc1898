"""Server processes for the tests: start one, wait until it listens, stop it on the way out."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from p2ppay import wire as p


class Log(list[str]):
    """A process's log lines as they are read, which one may wait on."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def add(self, line: str) -> None:
        self.append(line)
        self._grew.set()
        self._grew = trio.Event()

    async def line_with(self, text: str) -> str:
        """The first line with ``text`` in it, once there is one."""
        seen = 0
        while True:
            for line in self[seen:]:
                if text in line:
                    return line
            seen = len(self)
            await self._grew.wait()


@dataclass
class Proc:
    process: trio.Process
    port: int
    log: Log


@asynccontextmanager
async def spawn(
    cmd: list[str], marker: str, env: dict[str, str] | None = None, **popen: Any
) -> AsyncIterator[Proc]:
    """Start a server process; yield once its log says ``marker ... port N``. Its log is read
    all along (a full pipe would block it); on the way out it gets SIGTERM if still running.
    ``popen``: more for subprocess.Popen (e.g. ``preexec_fn``)."""
    process = await trio.lowlevel.open_process(cmd, stderr=subprocess.PIPE, env=env, **popen)
    log = Log()
    ready = trio.Event()
    found: list[int] = []

    async def drain() -> None:
        assert process.stderr is not None
        lines = p.LineBuffer(1 << 20)
        while data := await process.stderr.receive_some():
            lines.feed(data)
            while (line := lines.next_line()) is not None:
                text = line.decode(errors="replace")
                log.add(text)
                if marker in text and not found:
                    found.append(int(text.rsplit("port", 1)[1].split()[0]))
                    ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            with trio.fail_after(30):
                await ready.wait()
            try:
                yield Proc(process, found[0], log)
            finally:
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(20):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
    finally:
        if process.returncode is None:  # cancelled (or failed) before it was ready
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
