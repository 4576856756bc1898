"""``server --workers N``: N server processes on one machine, sharing the port(s).

The process the operator starts is the *supervisor*. It serves nothing itself: it checks that
the ports are free and holds them (ports.py; port 0 becomes one number every worker uses), then
starts N workers, each ``python -m p2ppay server <the same flags> --worker-index i``, which run
the ordinary server (run_server) with SO_REUSEPORT listeners, so the kernel spreads connections
over them. They share the state directory (the PKI, under its lock) and the PostgreSQL ledger
and presence, which is why more than one worker needs ``--ledger postgresql://...``.

Each worker has a socket pair with the supervisor (its end passed as ``--worker-fd``): a worker
says on it ``{"ready": [...]}`` once it listens, or ``{"failed": "one line"}`` when it stops on
an error; and it reads it until EOF, which means the supervisor is gone (even SIGKILLed): the
worker then stops itself gracefully (SIGTERM to itself) rather than serve on unsupervised.

Workers run in sessions of their own, so a Ctrl-C in the terminal reaches the supervisor only;
it passes SIGTERM to every worker once per signal it gets (the first stops each gracefully, as
one server stops; a second, while they drain, ends them at once, like a second Ctrl-C to one
server). Nothing is restarted: if a worker fails at start or dies later, the supervisor stops
the others and exits 1 with one line naming the worker, and whatever runs it (systemd's
``Restart=on-failure``) starts the whole set again. Each worker logs for itself, to the same
stderr, with ``[worker i]`` on each line (a ``worker`` field in JSON).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

import trio

from p2ppay.server.config import ServerOptions
from p2ppay.server.ports import BindError, check_free, reserve
from p2ppay.server.runner import StartupError, prepare_state_dir, run_server

log = logging.getLogger("p2ppay.server")

#: the longest message a worker sends the supervisor (a failure's one line)
MAX_MESSAGE: Final = 64 * 1024
#: once told to stop, workers get their --shutdown-grace and this much more before SIGKILL
STOP_MARGIN: Final = 30.0


# --------------------------------------------------------------------------------------------
# In a worker
# --------------------------------------------------------------------------------------------


@final
class SupervisorLink:
    """A worker's end of its socket pair with the supervisor."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()[: MAX_MESSAGE - 1] + b"\n"
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        self.sock.sendall(data)

    def failed(self, line: str) -> bool:
        """Tell the supervisor why this worker stops; False if it cannot be told."""
        try:
            self._send({"failed": line})
        except OSError:
            return False
        return True

    async def ready(self, addresses: Sequence[tuple[str, int]]) -> None:
        await trio.to_thread.run_sync(self._send, {"ready": [list(a) for a in addresses]})

    async def watch(self) -> None:
        """Return when the supervisor's end is closed (it has exited, or was killed)."""
        self.sock.setblocking(False)
        tsock = trio.socket.from_stdlib_socket(self.sock)
        try:
            while await tsock.recv(1024):
                pass
        except OSError:
            pass


async def run_worker(options: ServerOptions, link: SupervisorLink) -> None:
    """Run one worker: the ordinary server on SO_REUSEPORT listeners, which tells the
    supervisor when it listens and stops itself if the supervisor goes away."""
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            await run_server(options, handle_signals=True, reuse_port=True, task_status=task_status)
            nursery.cancel_scope.cancel()  # stops the watch below

        async def orphaned() -> None:
            await link.watch()
            log.warning("the supervisor is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)  # the server's own graceful stop

        addresses: list[tuple[str, int]] = await nursery.start(serve)
        await link.ready(addresses)
        nursery.start_soon(orphaned)


# --------------------------------------------------------------------------------------------
# In the supervisor
# --------------------------------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    process: trio.Process
    link: trio.socket.SocketType
    addresses: list[tuple[str, int]] = field(default_factory=list)
    #: its one line, if it said why it stopped
    failure: str | None = None

    def describe_exit(self) -> str:
        code = self.process.returncode
        if self.failure:
            return f"worker {self.index}: {self.failure}"
        if code is not None and code < 0:
            return f"worker {self.index} was killed by {signal.Signals(-code).name}"
        return f"worker {self.index} stopped with exit status {code}"


def worker_command(
    argv: Sequence[str],
    options: ServerOptions,
    index: int,
    fd: int,
    port: int,
    course_port: int | None,
) -> list[str]:
    """The worker's command line: the supervisor's own flags, then what differs (argparse
    keeps the last of a repeated flag): the ports resolved, its index and socket."""
    cmd = [sys.executable, "-m", "p2ppay", *argv, "--state-dir", str(options.state_dir)]
    cmd += ["--port", str(port)]
    if course_port is not None:
        cmd += ["--course-port", str(course_port)]
    if options.metrics_port is not None:
        metrics = options.metrics_port + index if options.metrics_port else 0
        cmd += ["--metrics-port", str(metrics)]
    return [*cmd, "--worker-index", str(index), "--worker-fd", str(fd)]


async def _read_message(sock: trio.socket.SocketType) -> dict[str, Any] | None:
    """The worker's one message, or None if it closed its end without one."""
    data = b""
    while b"\n" not in data and len(data) < MAX_MESSAGE:
        try:
            chunk = await sock.recv(4096)
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    try:
        message = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


@final
class Supervisor:
    """Starts the workers, passes signals on, and stops them all when one stops."""

    def __init__(self, options: ServerOptions, argv: Sequence[str]) -> None:
        self.options = options
        self.argv = list(argv)
        self.workers: list[Worker] = []
        #: why the set is stopping (None: it is not)
        self.stopping: str | None = None
        #: the first worker's failure: what the supervisor's exit line says
        self.failure: str | None = None
        self._changed = trio.Event()
        self._held: list[socket.socket] = []
        #: every worker has said it listens
        self.announced = False
        #: the course dialect's port, once resolved
        self.course_port: int | None = None

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _reserve(self) -> tuple[int, int | None]:
        """Check every port now (one clear line if one is taken), and hold the shared ones."""
        o = self.options
        port, held = reserve(o.port, o.host)
        self._held += held
        course_port = None
        if o.course_port is not None:
            course_port, held = reserve(o.course_port, o.host)
            self._held += held
        if o.metrics_port:
            for i in range(o.workers):
                check_free(o.metrics_port + i, o.metrics_host)
        return port, course_port

    def _release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()

    def stop(self, why: str) -> None:
        """Ask every running worker to stop (SIGTERM); once more forces them."""
        if self.stopping is None:
            self.stopping = why
            log.info("stopping the workers (%s)", why)
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        self._note()

    async def run(self) -> None:
        """Run the workers until they have all stopped; raises StartupError if they could not
        start, or if one of them failed or died (then the others were stopped)."""
        o = self.options
        await trio.to_thread.run_sync(prepare_state_dir, o.state_dir)
        try:
            port, self.course_port = self._reserve()
        except BindError as exc:
            self._release()
            raise StartupError(str(exc)) from None
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pass_signals, signals)
                    for i in range(o.workers):
                        if self.stopping is None:
                            await self._start(nursery, i, port, self.course_port)
                    await self._until_all_stopped()
                    nursery.cancel_scope.cancel()
        finally:
            self._release()
            for worker in self.workers:
                worker.link.close()
        if self.failure is not None:
            raise StartupError(self.failure)
        log.info("stopped")

    async def _start(
        self, nursery: trio.Nursery, index: int, port: int, course_port: int | None
    ) -> None:
        ours, theirs = socket.socketpair()
        try:
            cmd = worker_command(self.argv, self.options, index, theirs.fileno(), port, course_port)
            process = await trio.lowlevel.open_process(
                cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its copy: its exit is our EOF
        worker = Worker(index, process, trio.socket.from_stdlib_socket(ours))
        self.workers.append(worker)
        log.info("worker %d started (pid %d)", index, process.pid)
        nursery.start_soon(self._watch, worker)

    async def _watch(self, worker: Worker) -> None:
        message = await _read_message(worker.link)
        if message is not None and isinstance(message.get("ready"), list):
            worker.addresses = [(str(h), int(p)) for h, p in message["ready"]]
            self._note()
            message = await _read_message(worker.link)  # its failure, if it fails later
        if message is not None and isinstance(message.get("failed"), str):
            worker.failure = message["failed"]
        code = await worker.process.wait()
        # Told to stop, a worker exits 0; or dies of the SIGTERM if it came before the worker
        # could handle it (during its start).
        as_told = code in (0, -signal.SIGTERM) and worker.failure is None
        if self.stopping is None or not as_told:
            if self.failure is None:
                self.failure = worker.describe_exit()
            if worker.failure is None and self.announced:  # it died while serving
                log.error("%s", self.failure)
            self.stop(f"worker {worker.index} stopped")
        else:
            log.info("worker %d stopped (exit status %s)", worker.index, worker.process.returncode)
        self._note()

    async def _pass_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("received %s", name)
            self.stop(f"received {name}")

    async def _until_all_stopped(self) -> None:
        deadline: float | None = None
        while True:
            running = [w for w in self.workers if w.process.returncode is None]
            if not running and (self.stopping is not None or not self.workers):
                return
            ready = [w for w in self.workers if w.addresses]
            if not self.announced and len(ready) == self.options.workers and not self.stopping:
                self.announced = True
                self._release()  # the workers hold the ports now
                self._announce(ready[0])
            if self.stopping is not None and deadline is None:
                deadline = trio.current_time() + self.options.config.shutdown_grace + STOP_MARGIN
            changed = self._changed
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await changed.wait()
                continue
            for worker in running:  # still there long after their grace: end them
                log.error("worker %d did not stop in time: killing it", worker.index)
                worker.process.kill()
            deadline = float("inf")

    def _announce(self, worker: Worker) -> None:
        for host, port in worker.addresses:
            what = "course dialect" if port == self.course_port else "TLS"
            log.info(
                "all %d workers listening on %s port %d (%s)", len(self.workers), host, port, what
            )


async def supervise(options: ServerOptions, argv: Sequence[str]) -> None:
    """Run ``options.workers`` worker processes until told to stop (see the module's text)."""
    await Supervisor(options, argv).run()
