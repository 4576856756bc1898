"""Logging, configured in one place: plain text or JSON lines, and floods said once a minute.

JSON lines carry ``time``, ``level``, ``logger`` and ``message``, then any fields a call passed
with ``extra=`` (``payment_id``, say), and ``peer`` and ``user`` for whatever is logged while a
connection is being served: the server binds each connection's session to its task once
(:func:`bind_connection`), and every log line of that task, in whichever module, gets the
peer's address and the account it is logged in as at that moment. No log call has to name them.

:class:`LimitLog` keeps a flood of one kind of line (a limit hit, a commit failing) to one line
per interval with a count; the server and the client's peer listener both use it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Final, Literal, Protocol, TextIO

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")


class Connection(Protocol):
    """What a log line wants to know about the connection it is about."""

    @property
    def ip(self) -> str: ...

    @property
    def user(self) -> str | None: ...


_CONNECTION: ContextVar[Connection | None] = ContextVar("p2ppay_connection", default=None)


def bind_connection(connection: Connection) -> None:
    """Log lines of the current task (and of tasks it starts from now on) are about
    ``connection``. Trio gives each task its own copy of the context, so this never leaks
    into another connection's task."""
    _CONNECTION.set(connection)


class ConnectionFields(logging.Filter):
    """Adds ``peer`` and ``user`` from the bound connection, unless the call gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        connection = _CONNECTION.get()
        if connection is not None:
            if not hasattr(record, "peer"):
                record.peer = connection.ip
            user = connection.user
            if user is not None and not hasattr(record, "user"):
                record.user = user
        return True


class WorkerField(logging.Filter):
    """Adds ``worker``: which of the server's worker processes (``--workers``) logged this."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


#: a LogRecord's own attributes; everything else on a record came from ``extra=`` or a filter
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(
    level: str = "info",
    fmt: LogFormat = "text",
    *,
    text_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
    stream: TextIO | None = None,
    worker: int | None = None,
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``fmt``; replaces
    whatever handlers the root logger had. Python warnings are logged too, so that with
    ``json`` every line on stderr is JSON. A ``worker`` (its index) is named on every line:
    ``[worker 1]`` before the logger's name, or a ``worker`` field."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ConnectionFields())
    if worker is not None:
        handler.addFilter(WorkerField(worker))
        text_format = text_format.replace("%(name)s", "[worker %(worker)s] %(name)s", 1)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(fmt == "json")


def final_line(text: str, fmt: LogFormat) -> None:
    """The one line that says why a program stopped: as it is, or with ``json`` as one more
    JSON log line (so that every line on stderr still parses)."""
    if fmt == "json":
        logging.getLogger("p2ppay").error("%s", text)
    else:
        print(text, file=sys.stderr)


class LimitLog:
    """Logs that a limit was hit, or that something failed, once, then at most once per
    ``interval`` for each limit or kind of failure, with a count of those left unsaid: a
    flood (of refused connections, of commits failing on a full disk) costs the log a line a
    minute, not a line each."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        label: str = "limit",
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        #: each line starts with it, then the limit's name (``limit line-timeout: ...``)
        self.label = label
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def hit(self, limit: str, detail: str) -> None:
        """A limit refused something (a warning: the server is doing its job)."""
        self._report(logging.WARNING, f"limit {limit}", f"{self.label} {limit}: {detail}")

    def failed(self, kind: str, message: str) -> None:
        """Something failed that should not have (an error: the ledger could not commit,
        say); ``kind`` is what is counted (e.g. ``ledger deposit``), ``message`` the line."""
        self._report(logging.ERROR, f"failed {kind}", message)

    def _report(self, level: int, key: str, line: str) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        suffix = f" (and {more} more since the last report)" if more else ""
        self.logger.log(level, "%s%s", line, suffix)
