"""The exit statuses of ``p2ppay server``, ``client`` and ``admin`` (the README lists them)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    #: everything asked was done (for the server: it stopped when told to)
    OK = 0
    #: a command failed (the server or the payee said no; the ledger refused an admin command,
    #: or its audit failed); the server could not start
    FAILED = 1
    #: the command line cannot be used: an unknown flag or command, a bad value, no password
    USAGE = 2
    #: the client could not reach the server (or lost it and could not get it back)
    UNREACHABLE = 3
    #: the server's ledger file cannot be trusted: damaged (not a database, fails its
    #: integrity check), or missing from a state directory that holds a CA (see
    #: ``--new-ledger``). Restarting does not help: a person must look
    LEDGER = 4
    #: stopped by Ctrl-C (SIGINT) before it was ready to handle it (128 + SIGINT)
    INTERRUPTED = 130
    #: whoever read standard output went away (``... | head``): stopped quietly, as a Unix
    #: program killed by SIGPIPE (128 + SIGPIPE); a command that had failed keeps its status
    OUTPUT_CLOSED = 141


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has closed it."""
    import select
    import sys

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(mask & select.POLLERR for _, mask in poller.poll(0))
    except (OSError, ValueError):
        return False


def quiet_stdout() -> None:
    """Whoever read standard output has gone (``p2ppay admin export | head``): point it at
    the null device, so that what is still buffered, and the interpreter's flush at exit,
    go nowhere instead of failing with a traceback."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # (no real stdout: nothing to quiet)
        pass
