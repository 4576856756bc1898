"""The terminal client: interactive shell and scripted commands, over the Wallet."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import re
import shlex
import signal
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO, TypeVar, final

import msgspec
import platformdirs
import trio

from p2ppay import wire as p
from p2ppay.cli.bursts import RequestBurst
from p2ppay.cli.exitcodes import ExitCode, quiet_stdout
from p2ppay.cli.terminal import OutputClosed, RichBackend, Terminal, make_terminal, printable
from p2ppay.client.connection import ClientError, ConnectionLost, ServerError
from p2ppay.client.peer import PeerConfig, Policy, accept_all, decline_all
from p2ppay.client.wallet import (
    CannotConnect,
    Disconnected,
    LoggedOut,
    NoSuchAddress,
    NotSettledNews,
    OfferAnswered,
    PaymentFailed,
    PortUnavailable,
    Reconnected,
    Wallet,
    WalletEvent,
)
from p2ppay.tls import MissingCA, client_context
from p2ppay.wire.constraints import (
    MAX_HISTORY,
    MAX_PORT,
    MIN_PORT,
    is_port,
    memo_problem,
    parse_duration,
)
from p2ppay.wire.names import NAME_MAX, is_valid_name

T = TypeVar("T")

PASSWORD_ENV: Final = "P2PPAY_PASSWORD"
#: where ``passwd`` in a script takes the new password from (else standard input's first line)
NEW_PASSWORD_ENV: Final = "P2PPAY_NEW_PASSWORD"
AMOUNT_RE: Final = re.compile(r"[0-9]{1,16}")

HELP: Final = """Commands:
  register [NAME]     create an account (you choose a password)
  login [NAME]        log in and start taking payments
  deposit AMOUNT      add money to your account
  balance             show your balance
  list                your balance and who is online
  pay NAME AMOUNT [--memo TEXT] [--id UUID]
                      pay NAME directly; they accept or decline. With --id, safe to
                      repeat: a payment already settled is not paid again
  pay --request ID    pay a request someone made to you (safe to repeat)
  status ID           whether payment ID is settled (yours to see: you paid or were paid)
  request NAME AMOUNT [--memo TEXT] [--expires 2h]
                      ask NAME to pay you (they can pay while you are away)
  requests            open requests to you and from you, with their ids
  decline-request ID  say no to a request made to you
  cancel-request ID   take back a request you made
  receipt ID [--out FILE]
                      the server's signed receipt of a payment (JSON)
  passwd              change your password
  history [N] [--with NAME] [--since DATE] [--until DATE] [--limit N] [--csv [--out FILE]]
                      your movements, newest first (default the last 20; with --csv all);
                      DATE is in UTC: 2026-11-29 (the whole day) or 2026-11-29T14:30
  logout              log out (stop taking payments)
  serve               stay online taking offers until Ctrl-C or SIGTERM
  help                this text
  exit                log out and leave (also Ctrl-D)
Words are split like a shell's: quote a word with spaces ("..." or '...').
The seed program's menu works too: 1 register, 2 login, 3 list, 4 pay, 5 exit.
Amounts are whole numbers."""

MENU: Final = {"1": "register", "2": "login", "3": "list", "4": "pay", "5": "exit"}
NEEDS_LOGIN: Final = frozenset(
    {"deposit", "balance", "list", "pay", "status", "history", "logout", "serve"}
    | {"request", "requests", "decline-request", "cancel-request", "receipt", "passwd"}
)
#: the most words (besides options) each command takes after its name
MAX_ARGS: Final = {
    "register": 1,
    "login": 1,
    "deposit": 1,
    "balance": 0,
    "list": 0,
    "pay": 2,
    "status": 1,
    "history": 1,
    "logout": 0,
    "serve": 0,
    "help": 0,
    "exit": 0,
    "quit": 0,
    "request": 2,
    "requests": 0,
    "decline-request": 1,
    "cancel-request": 1,
    "receipt": 1,
    "passwd": 0,
}
#: history rows shown when no number is asked for (``--csv`` exports everything)
DEFAULT_HISTORY: Final = 20
#: the most movements one ``history`` may ask for (it is fetched in pages of MAX_HISTORY)
MAX_HISTORY_ASKED: Final = 10**9
#: (memo last: the columns before it are where they were before memos)
CSV_HEADER: Final = (
    "time",
    "at_ms",
    "kind",
    "amount",
    "balance",
    "counterparty",
    "payment_id",
    "memo",
)


class UsageError(Exception):
    """The person typed something we cannot use; explain and ask again."""


class _Cancelled(Exception):
    """The person gave up on a prompt (Ctrl-D)."""


@dataclass(frozen=True, slots=True)
class ClientOptions:
    host: str
    port: int
    cafile: Path
    server_name: str | None = None
    user: str | None = None
    password_file: Path | None = None
    listen_host: str | None = None
    listen_port: int | None = None  # None: ask at an interactive login (else any free port)
    accept: Literal["ask", "all", "none"] = "ask"
    ask_timeout: float = 30.0
    commands: str | None = None
    json: bool = False


def command_history_path() -> Path:
    """Where the interactive client keeps typed commands across runs: the user's state
    directory (``~/.local/state/p2ppay`` on Linux), mode 0600."""
    return Path(platformdirs.user_state_dir("p2ppay", appauthor=False)) / "client-history"


def parse_amount(text: str) -> int:
    if not AMOUNT_RE.fullmatch(text) or int(text) < 1:
        raise UsageError(f"the amount must be a positive whole number, like 300 (not {text!r})")
    return int(text)


def parse_name(text: str) -> str:
    if not is_valid_name(text):
        raise UsageError(
            f"{text!r} is not a valid name: 1-{NAME_MAX} letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return text


def parse_count(text: str) -> int:
    """How many movements ``history`` shows (more than a page are fetched page by page)."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_HISTORY_ASKED:
        raise UsageError(
            f"the number of movements must be a whole number from 1 to {MAX_HISTORY_ASKED} "
            f"(not {text!r})"
        )
    return int(text)


def parse_id(text: str, what: str = "payment id") -> uuid.UUID:
    """A payment, request or deposit id as typed: a UUID with its dashes (any letter case),
    the form the server takes and every id is shown in."""
    if not p.CANONICAL_UUID.fullmatch(text.lower()):
        raise UsageError(
            f"{text!r} is not a {what}: a UUID like 12345678-1234-5678-1234-567812345678"
        )
    return uuid.UUID(text.lower())


def parse_payment_id(text: str) -> uuid.UUID:
    return parse_id(text, "payment id")


def parse_request_id(text: str) -> uuid.UUID:
    return parse_id(text, "request id")


def parse_deposit_id(text: str) -> uuid.UUID:
    return parse_id(text, "deposit id")


def _parse_moment(text: str, option: str) -> tuple[dt.datetime, bool]:
    """A date or date-time in UTC (an explicit offset is honoured); True if a date alone."""
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            day = dt.date.fromisoformat(text)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC), True
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option} takes a date or a date and time in UTC, like 2026-11-29 or "
            f"2026-11-29T14:30 (not {text!r})"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment, False


def _ms(moment: dt.datetime) -> int:
    ms = int(moment.timestamp() * 1000)
    if not 0 <= ms <= 2**53:
        raise UsageError(f"{moment.isoformat()} is out of range")
    return ms


def parse_since(text: str) -> int:
    """``--since``: from this moment on (a date alone: from its first instant), Unix ms."""
    return _ms(_parse_moment(text, "--since")[0])


def parse_until(text: str) -> int:
    """``--until``: before this moment (a date alone: up to its end, the whole day in),
    Unix ms, exclusive."""
    moment, whole_day = _parse_moment(text, "--until")
    return _ms(moment + dt.timedelta(days=1) if whole_day else moment)


def parse_path(text: str) -> Path:
    """A file to write (``~`` is the home directory)."""
    if not text:
        raise UsageError("the file name is empty")
    return Path(text).expanduser()


def parse_memo(text: str) -> str:
    problem = memo_problem(text)
    if problem is not None:
        raise UsageError(problem)
    return text


def parse_expiry(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


#: Each command's options: the parser of its value, or None for a flag without one.
OPTIONS: Final[dict[str, dict[str, Callable[[str], Any] | None]]] = {
    "pay": {"--id": parse_payment_id, "--memo": parse_memo, "--request": parse_request_id},
    "request": {"--memo": parse_memo, "--expires": parse_expiry},
    "receipt": {"--out": parse_path},
    "deposit": {"--id": parse_deposit_id},
    "history": {
        "--with": parse_name,
        "--since": parse_since,
        "--until": parse_until,
        "--limit": parse_count,
        "--csv": None,
        "--out": parse_path,
    },
}


def parse_args(command: str, args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """A command's words: its positional arguments, and its options parsed (``--opt VALUE``
    or ``--opt=VALUE``). An unknown option, one given twice, or a word too many is refused."""
    known = OPTIONS.get(command, {})
    positional: list[str] = []
    options: dict[str, Any] = {}
    words = iter(args)
    for word in words:
        if not word.startswith("--"):
            positional.append(word)
            continue
        name, has_value, value = word.partition("=")
        if name not in known:
            raise UsageError(f"{command} does not take {word!r}; type help for the usage")
        if name in options:
            raise UsageError(f"{command}: {name} is given twice")
        parse = known[name]
        if parse is None:
            if has_value:
                raise UsageError(f"{command}: {name} takes no value")
            options[name] = True
            continue
        if not has_value:
            value = next(words, None)  # type: ignore[assignment]
            if value is None:
                raise UsageError(f"{command}: {name} needs a value")
        options[name] = parse(value)
    most = MAX_ARGS.get(command, len(positional))
    if len(positional) > most:
        extra = " ".join(positional[most:])
        raise UsageError(f"{command} does not take {extra!r}; type help for the usage")
    return positional, options


def parse_port(text: str) -> int:
    """A P2P port, or 0 for "any free port" when left empty."""
    if not text:
        return 0
    if not text.isdigit() or not is_port(int(text)):
        raise UsageError(f"the port must be a number from {MIN_PORT} to {MAX_PORT} (not {text!r})")
    return int(text)


def _for(memo: str | None) -> str:
    """`` for "memo"``, escaped, or nothing."""
    return "" if memo is None else f' for "{printable(memo)}"'


def format_requests(result: p.RequestsResult) -> str:
    lines: list[str] = []
    for title, requests, total, other in (
        ("Asking you to pay", result.incoming, result.incoming_total, "FROM"),
        ("Your requests", result.outgoing, result.outgoing_total, "TO"),
    ):
        # (No total: a server from before the totals; it showed at most 100 of each.)
        more = 0 if total is None else max(0, total - len(requests))
        shown = f"{len(requests)} of {total}" if more else f"{len(requests)}"
        lines.append(f"{title} ({shown}):")
        if not requests:
            continue
        width = max(
            len(other), *(len(r.requester if other == "FROM" else r.payer) for r in requests)
        )
        lines.append(f"  {'ID':<36}  {other:<{width}}  {'AMOUNT':>10}  {'EXPIRES (UTC)':<19}  MEMO")
        for r in requests:
            who = r.requester if other == "FROM" else r.payer
            lines.append(
                f"  {r.request_id!s:<36}  {who:<{width}}  {r.amount:>10}  "
                f"{_when(r.expires_ms):<19}  {printable(r.memo or '')}".rstrip()
            )
        if more:
            lines.append(f"  ...and {more} more")
    return "\n".join(lines)


def describe_request_closed(r: p.RequestInfo) -> str:
    what = f"request {r.request_id} for {r.amount}{_for(r.memo)}"
    if r.state == "paid":
        return f"{r.payer} paid your {what}."
    if r.state == "declined":
        return f"{r.payer} declined your {what}."
    return f"{r.requester} cancelled the {what}."


def split_commands(script: str) -> list[str]:
    """A ``-c`` script's commands: separated by ``;`` or a new line, except inside quotes
    (quoted as in :func:`split_words`; the quotes stay for it to remove)."""
    commands: list[str] = []
    current: list[str] = []
    quote: str | None = None
    chars = iter(script)
    for ch in chars:
        if quote is None and ch in ";\n":
            commands.append("".join(current))
            current = []
            continue
        current.append(ch)
        if ch == "\\" and quote != "'":
            current.append(next(chars, ""))  # an escaped character is never a separator
        elif quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
    commands.append("".join(current))
    return [command.strip() for command in commands if command.strip()]


def split_words(line: str) -> list[str]:
    """A command line's words, split like a POSIX shell's: quotes group, backslash escapes."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        reason = "a quote is not closed" if "quotation" in str(exc) else "it ends with \\"
        raise UsageError(f"cannot read {line!r}: {reason}") from None


def complete(before_cursor: str, names: list[str]) -> list[str]:
    """What may follow at the end of ``before_cursor``: a command, an option of the command,
    or an online name (from the last ``list``) where a name goes."""
    words = before_cursor.split(" ")
    current = words[-1]
    if len(words) == 1:
        candidates: list[str] = [c for c in MAX_ARGS if c != "quit"]
    else:
        command = words[0].lower()
        previous = words[-2] if len(words) > 2 else ""
        options = OPTIONS.get(command, {})
        if current.startswith("-"):
            candidates = list(options)
        elif previous == "--with" or (
            command in ("pay", "request") and [w for w in words[1:-1] if w] == []
        ):
            candidates = names
        else:
            candidates = []
    return sorted(c for c in candidates if c.startswith(current))


def _when(at_ms: int) -> str:
    """A moment as shown and exported: UTC, like the dates ``history`` takes."""
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: what makes a spreadsheet take a cell for a formula (OWASP's "CSV injection" list)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """Text someone else chose (a memo) as a CSV cell that a spreadsheet shows, never runs: a
    leading ``'`` before a formula's first character."""
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def csv_rows(entries: list[p.HistoryEntry], header: bool = False) -> str:
    """History entries as RFC 4180 CSV (CRLF line ends, quoted where needed). A memo that
    would start a spreadsheet formula gets a leading ``'`` (the payer or requester wrote it)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_HEADER)
    for e in entries:
        writer.writerow(
            (
                _iso(e.at_ms),
                e.at_ms,
                e.kind,
                e.amount,
                e.balance,
                e.counterparty or "",
                e.payment_id or "",
                _cell(e.memo or ""),
            )
        )
    return out.getvalue()


def format_list(result: p.ListResult) -> str:
    lines = [f"Balance: {result.balance}", f"Online ({len(result.online)}):"]
    if result.online:
        width = max(4, *(len(u.name) for u in result.online))
        wide = max(7, *(len(u.ip) for u in result.online))
        lines.append(f"  {'NAME':<{width}}  {'ADDRESS':<{wide}}  PORT")
        for u in result.online:
            port = "-" if u.port is None else str(u.port)
            lines.append(f"  {printable(u.name):<{width}}  {printable(u.ip):<{wide}}  {port}")
    return "\n".join(line.rstrip() for line in lines)


def format_history(entries: list[p.HistoryEntry]) -> str:
    if not entries:
        return "No movements yet."
    width = max(4, *(len(e.counterparty or "") for e in entries))
    lines = [
        f"  {'WHEN (UTC)':<19}  {'KIND':<8}  {'AMOUNT':>10}  {'BALANCE':>10}  "
        f"{'WITH':<{width}}  MEMO"
    ]
    for e in entries:
        lines.append(
            f"  {_when(e.at_ms):<19}  {e.kind:<8}  {e.amount:>10}  {e.balance:>10}  "
            f"{e.counterparty or '':<{width}}  {printable(e.memo or '')}".rstrip()
        )
    return "\n".join(lines)


async def _export_csv(
    path: Path, each_page: Callable[[Callable[[p.HistoryResult], Awaitable[None]]], Awaitable[None]]
) -> int:
    """Write the pages as CSV to ``path``; returns the number of movements. The file is
    written beside it under another name and renamed at the end: an export that fails
    half-way leaves no half file (and whatever was at ``path`` stays)."""
    partial = trio.Path(path.parent / f".{path.name}.partial")
    count = 0
    try:
        async with await trio.open_file(partial, "w", encoding="utf-8", newline="") as f:
            await f.write(csv_rows([], header=True))

            async def take(page: p.HistoryResult) -> None:
                nonlocal count
                await f.write(csv_rows(page.entries))
                count += len(page.entries)

            await each_page(take)
        await partial.replace(path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if await partial.exists():
            await partial.unlink()
    return count


def format_status(status: p.PaymentStatusResult) -> str:
    if not status.settled:
        return (
            f"Payment {status.payment_id}: not settled (or not yours to see: only its payer "
            "and payee are told)"
        )
    assert status.at_ms is not None
    return (
        f"Payment {status.payment_id}: settled: {status.payer} paid {status.payee} "
        f"{status.amount}{_for(status.memo)} at {_when(status.at_ms)} UTC. Your balance "
        f"right after: {status.balance}"
    )


def read_password_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the password file {path}: {exc.strerror}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise UsageError(f"the password file {path} is empty")
    return password


@final
class Shell:
    """Runs commands against a wallet and shows what happens."""

    def __init__(
        self, wallet: Wallet, terminal: Terminal, options: ClientOptions, out: TextIO
    ) -> None:
        self.wallet = wallet
        self.terminal = terminal
        self.options = options
        self.out = out
        self.interactive = options.commands is None
        #: the exit status so far: the first failure decides it
        self.status = ExitCode.OK
        self._serving: trio.CancelScope | None = None
        #: the last news was that a newer login took this session over
        self._replaced = False
        #: the payment port chosen at the prompt, kept once a login has worked with it
        self._chosen_port: int | None = None
        #: who was online at the last ``list`` (for completion)
        self.online_names: list[str] = []
        #: the payment the command under way is making (its id goes with every outcome)
        self.payment_id: uuid.UUID | None = None
        #: how to retry that payment after server_unreachable
        self._retry = "pay ... --id"
        #: requests made to us (and cancelled) are shown a few per burst of each requester
        self._bursts = RequestBurst(trio.current_time)

    @property
    def serving(self) -> bool:
        """True while the ``serve`` command runs."""
        return self._serving is not None

    @property
    def failed(self) -> bool:
        return self.status is not ExitCode.OK

    # -- output --

    def say(self, text: str) -> None:
        if not self.options.json:
            self.terminal.write(text)

    def emit(self, command: str, result: Any, human: str) -> None:
        if self.options.json:
            self._json({"command": command, "ok": True, "result": msgspec.to_builtins(result)})
        else:
            self.terminal.write(human)

    def emit_error(
        self, command: str, code: str, message: str, status: ExitCode = ExitCode.FAILED
    ) -> None:
        if self.status is ExitCode.OK:
            self.status = status
        error: dict[str, Any] = {"code": code, "message": message}
        if command == "pay":  # its id, so that it can be checked (status) or retried (--id)
            error["payment_id"] = None if self.payment_id is None else str(self.payment_id)
        if self.options.json:
            self._json({"command": command, "ok": False, "error": error})
            return
        if command == "pay" and self.payment_id is not None and code == "server_unreachable":
            message += f" (payment {self.payment_id}: status tells, {self._retry} retries it)"
        self.terminal.write(f"Error ({code}): {printable(message)}")

    def toolbar(self) -> str:
        """The line under the prompt: who is logged in, and the balance as last seen."""
        user = self.wallet.user
        if user is None:
            return "not logged in"
        balance = self.wallet.known_balance
        return f"{user}  balance: {'?' if balance is None else balance}"

    def complete(self, before_cursor: str) -> list[str]:
        return complete(before_cursor, self.online_names)

    def _json(self, obj: dict[str, Any]) -> None:
        self.terminal.write(json.dumps(obj, sort_keys=True))

    async def show_events(self) -> None:
        # (OutputClosed from here ends the client: cli.main says how)
        events = self.wallet.events
        while True:
            due = self._bursts.due()
            with trio.move_on_at(math.inf if due is None else due):
                try:
                    event = await events.receive()
                except trio.EndOfChannel:
                    break
                self.show_event(event)
                continue
            self._summarise_bursts()  # a requester's burst ended: one line for its rest
        self._summarise_bursts(flush=True)

    def _summarise_bursts(self, *, flush: bool = False) -> None:
        for line in self._bursts.summaries(flush=flush):
            self.terminal.write(printable(line))

    def _in_burst(self, requester: str) -> bool:
        """Whether a line about ``requester``'s requests is shown now: only the first few of
        a burst are (the rest are summed up in one line when it ends: bursts.py)."""
        self._summarise_bursts()  # (a burst of theirs that has ended is summed up first)
        return self._bursts.note(requester)

    def show_event(self, event: WalletEvent) -> None:
        if isinstance(event, p.SessionReplaced):
            self._replaced = True
        elif isinstance(event, Reconnected | OfferAnswered):
            self._replaced = False
        if isinstance(event, p.SessionReplaced | LoggedOut) and self._serving is not None:
            self._serving.cancel()  # an unattended payee that was logged out is of no use
        if self.options.json:
            if isinstance(event, OfferAnswered):
                self._json(
                    {
                        "event": "offer_answered",
                        "accepted": event.accepted,
                        "offer": msgspec.to_builtins(event.offer),
                    }
                )
            elif isinstance(event, Disconnected):
                self._json(
                    {
                        "event": "disconnected",
                        "reason": event.reason,
                        "reconnecting": event.reconnecting,
                    }
                )
            elif isinstance(event, Reconnected):
                self._json({"event": "reconnected", "name": event.name})
            elif isinstance(event, LoggedOut):
                self._json({"event": "logged_out", "reason": event.reason})
            elif isinstance(event, NotSettledNews):
                self._json(
                    {
                        "event": "not_settled",
                        "payer": event.payer,
                        "payment_id": str(event.news.payment_id),
                        "reason": event.news.reason,
                    }
                )
            else:
                self._json(msgspec.to_builtins(event))
            return
        if isinstance(event, p.PaymentReceived):
            text = (
                f"{event.payer} paid you {event.amount}{_for(event.memo)} (payment "
                f"{event.payment_id}). Your balance: {event.balance}"
            )
        elif isinstance(event, p.PaymentRequested):
            r = event.request
            if not self._in_burst(r.requester):
                return
            text = (
                f"{r.requester} asks you to pay {r.amount}{_for(r.memo)} by "
                f"{_when(r.expires_ms)} UTC: pay --request {r.request_id} (or decline-request)"
            )
        elif isinstance(event, p.RequestClosed):
            r = event.request
            if r.state == "cancelled" and not self._in_burst(r.requester):
                return
            text = describe_request_closed(r)
        elif isinstance(event, OfferAnswered):
            o = event.offer
            text = (
                f"You accepted {o.payer}'s offer of {o.amount}; waiting for it to settle."
                if event.accepted
                else f"You declined {o.payer}'s offer of {o.amount}."
            )
        elif isinstance(event, p.SessionReplaced):
            text = f"This session was closed: {event.message}."
        elif isinstance(event, p.ServerClosing):
            text = "The server is shutting down."
        elif isinstance(event, NotSettledNews):
            text = (
                f"{event.payer}'s payment {event.news.payment_id} that you accepted did not "
                f"go through: {event.news.reason}"
            )
        elif isinstance(event, Reconnected):
            text = f"Reconnected to the server; logged in again as {event.name}."
        elif isinstance(event, LoggedOut):
            text = f"Logged out: {event.reason}."
        elif event.reconnecting:
            text = "Lost the connection to the server; reconnecting..."
        elif self._replaced:
            return  # "This session was closed: ..." said it already
        else:
            text = "Lost the connection to the server; the next command reconnects."
        # Payers' reasons, the server's messages: shown, never obeyed (escape sequences...).
        self.terminal.write(printable(text))

    # -- input --

    async def ask_value(self, prompt: str, parse: Callable[[str], T]) -> T:
        """Prompt until the answer parses (interactive only); Ctrl-D gives up."""
        while True:
            try:
                text = (await self.terminal.read_line(prompt)).strip()
            except EOFError:
                raise _Cancelled from None
            try:
                return parse(text)
            except UsageError as exc:
                self.terminal.write(str(exc))

    async def password(self, confirm: bool = False) -> str:
        if self.options.password_file is not None:
            return read_password_file(self.options.password_file)
        env = os.environ.get(PASSWORD_ENV)
        if env:
            return env
        if not self.interactive:
            raise UsageError(f"no password: use --password-file or set {PASSWORD_ENV}")
        while True:
            try:
                first = await self.terminal.read_line("password: ", secret=True)
                if not first:
                    self.terminal.write("The password cannot be empty.")
                    continue
                if confirm and await self.terminal.read_line("again: ", secret=True) != first:
                    self.terminal.write("The two passwords differ; try again.")
                    continue
                return first
            except EOFError:
                raise _Cancelled from None

    async def name_arg(self, args: list[str], what: str) -> str:
        if args:
            return parse_name(args[0])
        if self.options.user:
            return parse_name(self.options.user)
        if not self.interactive:
            raise UsageError(f"{what} needs a name (or --user)")
        return await self.ask_value("name: ", parse_name)

    # -- commands --

    async def execute(self, line: str) -> bool:
        """Run one command line; False when the shell should end."""
        self.payment_id, self._retry = None, "pay ... --id"
        first = line.split(maxsplit=1)
        command = MENU.get(first[0].lower(), first[0].lower()) if first else ""
        try:
            words = split_words(line)
            if not words:
                return True
            command, args = words[0].lower(), words[1:]
            command = MENU.get(command, command)
            if command not in MAX_ARGS:
                raise UsageError(f"unknown command {command!r}; type help for the list")
            positional, options = parse_args(command, args)
            return await self._execute(command, positional, options)
        except UsageError as exc:
            self.emit_error(command, "usage", str(exc), ExitCode.USAGE)
        except PaymentFailed as exc:
            status = ExitCode.UNREACHABLE if exc.code == "server_unreachable" else ExitCode.FAILED
            self.emit_error(command, exc.code, exc.message, status)
        except ServerError as exc:
            self.emit_error(command, exc.code, exc.message)
        except PortUnavailable as exc:
            status = ExitCode.USAGE if isinstance(exc, NoSuchAddress) else ExitCode.FAILED
            self.emit_error(command, "port_unavailable", str(exc), status)
        except CannotConnect as exc:
            self.emit_error(command, "server_unreachable", str(exc), ExitCode.UNREACHABLE)
        except (ConnectionLost, OSError, trio.TooSlowError) as exc:
            self.emit_error(
                command,
                "server_unreachable",
                f"no connection to the server: {exc or 'no answer in time'}",
                ExitCode.UNREACHABLE,
            )
        except ClientError as exc:
            self.emit_error(command, "error", str(exc))
        except _Cancelled:
            self.say("(cancelled)")
        return True

    async def _execute(self, command: str, args: list[str], options: dict[str, Any]) -> bool:
        if command in ("exit", "quit"):
            return False
        if command == "help":
            self.say(HELP)
            return True
        if command == "register":
            name = await self.name_arg(args, "register")
            await self.wallet.register(name, await self.password(confirm=True))
            self.emit("register", {"name": name}, f"Registered {name}. Now log in: login {name}")
            return True
        if command == "login":
            await self.login(args)
            return True
        if command not in NEEDS_LOGIN and command not in ("register", "login"):
            raise UsageError(f"unknown command {command!r}; type help for the list")
        if self.wallet.user is None:
            if self.options.user:
                await self.login([])  # says so if there is no password to log in with
            else:
                raise UsageError("log in first (login NAME)")
        wallet = self.wallet
        if command == "deposit":
            amount = await self._amount(args, 0)
            balance = await wallet.deposit(amount, options.get("--id"))
            self.emit("deposit", {"balance": balance}, f"Deposited {amount}. Balance: {balance}")
        elif command == "balance":
            balance = await wallet.balance()
            self.emit("balance", {"balance": balance}, f"Balance: {balance}")
        elif command == "list":
            result = await wallet.list()
            self.online_names = [u.name for u in result.online]
            self.emit("list", result, format_list(result))
        elif command == "pay" and "--request" in options:
            # Paying a request makes the payment whose id is the request's: every outcome,
            # errors too, names it (and retrying it is paying the request again).
            self.payment_id = options["--request"]
            self._retry = f"pay --request {self.payment_id}"
            if args or "--memo" in options or "--id" in options:
                raise UsageError(
                    "pay --request ID takes no name, amount, --memo or --id: the request has "
                    "them (its id is the payment id)"
                )
            paid = await wallet.pay_request(options["--request"])
            self.emit(
                "pay",
                paid,
                f"Paid {paid.amount}{_for(paid.memo)} to {paid.payee} (payment "
                f"{paid.payment_id}). Your balance: {paid.balance}",
            )
        elif command == "pay":
            # The id is chosen here, before anything can fail, so that every outcome names it.
            given = options.get("--id")
            self.payment_id = given or uuid.uuid4()
            payee = parse_name(args[0]) if args else await self._prompted("payee: ", parse_name)
            amount = await self._amount(args, 1)
            paid = await wallet.pay(
                payee,
                amount,
                self.payment_id,
                on_offer=lambda o: self.say(f"Offering {o.amount} to {o.payee}..."),
                memo=options.get("--memo"),
                new_id=given is None,  # (a retry names its id: only then was it perhaps paid)
            )
            self.emit(
                "pay",
                paid,
                f"Paid {paid.amount}{_for(paid.memo)} to {paid.payee} (payment "
                f"{paid.payment_id}). Your balance: {paid.balance}",
            )
        elif command == "status":
            if not args:
                raise UsageError("status needs a payment id")
            status = await wallet.payment_status(parse_payment_id(args[0]))
            self.emit("status", status, format_status(status))
        elif command == "request":
            payer = parse_name(args[0]) if args else await self._prompted("from: ", parse_name)
            amount = await self._amount(args, 1)
            made = await wallet.request(
                payer, amount, options.get("--memo"), options.get("--expires")
            )
            self.emit(
                "request",
                made,
                f"Asked {made.payer} to pay you {made.amount}{_for(made.memo)} (request "
                f"{made.request_id}, open until {_when(made.expires_ms)} UTC).",
            )
        elif command == "requests":
            listed = await wallet.requests()
            self.emit("requests", listed, format_requests(listed))
        elif command in ("decline-request", "cancel-request"):
            if not args:
                raise UsageError(f"{command} needs a request id (see requests)")
            rid = parse_request_id(args[0])
            if command == "decline-request":
                closed = await wallet.decline_request(rid)
                human = f"Declined {closed.requester}'s request {closed.request_id}."
            else:
                closed = await wallet.cancel_request(rid)
                human = f"Cancelled your request {closed.request_id} to {closed.payer}."
            self.emit(command, closed, human)
        elif command == "receipt":
            if not args:
                raise UsageError("receipt needs a payment id (see history)")
            receipt = msgspec.to_builtins(await wallet.receipt(parse_payment_id(args[0])))
            text = json.dumps(receipt, indent=2, sort_keys=True)
            if "--out" in options:
                out = trio.Path(options["--out"])
                try:
                    await out.write_text(text + "\n", encoding="utf-8")
                except OSError as exc:
                    raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
                self.emit(
                    "receipt",
                    {"file": str(out), "receipt": receipt},
                    f"Wrote the receipt of payment {receipt['payment_id']} to {out}.",
                )
            else:
                self.emit("receipt", receipt, text)
        elif command == "passwd":
            old, new = await self._passwords()
            await wallet.passwd(old, new)
            self.emit("passwd", {}, "Password changed; any other session of yours was logged out.")
        elif command == "history":
            await self._history(args, options)
        elif command == "logout":
            await wallet.logout()
            self.emit("logout", {}, "Logged out.")
        elif command == "serve":
            self.say(
                f"Serving offers as {wallet.user} on port {wallet.p2p_port}; "
                "Ctrl-C or SIGTERM to stop."
            )
            with trio.CancelScope() as self._serving:
                await trio.sleep_forever()
            self._serving = None
            self.emit_error("serve", "session_replaced", "logged in elsewhere; stopped serving")
        return True

    async def _history(self, args: list[str], options: dict[str, Any]) -> None:
        if args and "--limit" in options:
            raise UsageError("history: give the number of movements once (N or --limit N)")
        csv_out = bool(options.get("--csv"))
        out: Path | None = options.get("--out")
        if out is not None and not csv_out:
            raise UsageError("history: --out goes with --csv")
        limit: int | None = parse_count(args[0]) if args else options.get("--limit")
        if limit is None and not csv_out:
            limit = DEFAULT_HISTORY
        since, until = options.get("--since"), options.get("--until")
        if since is not None and until is not None and since >= until:
            raise UsageError("history: --since must be before --until")

        async def each_page(take: Callable[[p.HistoryResult], Awaitable[None]]) -> None:
            # Page by page (each at most the protocol's page) until done or enough: an export
            # is written as it comes, so a long history never sits in memory whole.
            before: int | None = None
            count = 0
            while True:
                size = MAX_HISTORY if limit is None else min(MAX_HISTORY, limit - count)
                page = await self.wallet.history_page(
                    size,
                    before=before,
                    counterparty=options.get("--with"),
                    since_ms=since,
                    until_ms=until,
                )
                await take(page)
                count += len(page.entries)
                before = page.next
                if before is None or (limit is not None and count >= limit):
                    return

        if out is not None:
            count = await _export_csv(out, each_page)
            self.emit(
                "history",
                {"file": str(out), "movements": count},
                f"Wrote {count} movements to {out}.",
            )
            return
        chunks: list[str] = [csv_rows([], header=True)] if csv_out else []
        entries: list[p.HistoryEntry] = []
        last: list[int | None] = [None]

        async def take(page: p.HistoryResult) -> None:
            last[0] = page.next
            if csv_out and not self.options.json:
                if chunks:  # the header, once
                    self._write_csv(chunks.pop())
                self._write_csv(csv_rows(page.entries))
            elif csv_out:
                chunks.append(csv_rows(page.entries))
            else:
                entries.extend(page.entries)
            await trio.lowlevel.checkpoint()

        await each_page(take)
        if csv_out:
            if self.options.json:
                self._json({"command": "history", "ok": True, "result": {"csv": "".join(chunks)}})
            return
        self.emit("history", {"entries": entries, "next": last[0]}, format_history(entries))

    def _write_csv(self, text: str) -> None:
        # Written as it is, CRLF line ends included (the terminal adds the last "\n").
        if text:
            self.terminal.write(text.removesuffix("\n"))

    async def _passwords(self) -> tuple[str, str]:
        """``passwd``: the current password (as for login) and the new one, asked twice at a
        terminal; a script gives it in $P2PPAY_NEW_PASSWORD or on standard input."""
        if (
            self.interactive
            and self.options.password_file is None
            and not os.environ.get(PASSWORD_ENV)
        ):
            try:
                old = await self.terminal.read_line("current password: ", secret=True)
            except EOFError:
                raise _Cancelled from None
        else:
            old = await self.password()
        new = os.environ.get(NEW_PASSWORD_ENV)
        if not new and not self.interactive:
            try:
                new = (await self.terminal.read_line("")).rstrip("\r\n")
            except EOFError:
                new = ""
            if not new:
                raise UsageError(
                    f"no new password: set {NEW_PASSWORD_ENV} or give it on standard input"
                )
        while not new:
            try:
                first = await self.terminal.read_line("new password: ", secret=True)
                if await self.terminal.read_line("again: ", secret=True) != first:
                    self.terminal.write("The two passwords differ; try again.")
                    continue
            except EOFError:
                raise _Cancelled from None
            new = first
        low, high = p.NEW_PASSWORD_LENGTH
        if not low <= len(new) <= high:
            raise UsageError(f"a password must have {low} to {high} characters")
        return old, new

    async def _prompted(self, prompt: str, parse: Callable[[str], T]) -> T:
        if not self.interactive:
            raise UsageError(f"missing {prompt.rstrip(': ')}")
        return await self.ask_value(prompt, parse)

    async def _amount(self, args: list[str], index: int) -> int:
        if len(args) > index:
            return parse_amount(args[index])
        return await self._prompted("amount: ", parse_amount)

    async def login(self, args: list[str]) -> None:
        name = await self.name_arg(args, "login")
        password = await self.password()
        port = self._chosen_port
        if self.interactive and self.options.listen_port is None and port is None:
            port = await self.ask_value("port for payments (Enter: any free port): ", parse_port)
        result = await self.wallet.login(name, password, listen_port=port)
        self._replaced = False
        # Asked once per shell, but only once it has worked: a taken port is asked for again.
        self._chosen_port = port
        self.emit(
            "login",
            {
                "name": result.name,
                "balance": result.balance,
                "ip": result.ip,
                "port": self.wallet.p2p_port,
            },
            f"Logged in as {result.name}. Balance: {result.balance}. "
            f"Taking payments on port {self.wallet.p2p_port}.",
        )

    async def run_interactive(self) -> int:
        self.say("p2ppay client. Type help for the commands.")
        # Ctrl-C at any prompt (the command line, a password, a port) leaves, like Ctrl-D at
        # the command line; the wallet logs out on the way.
        try:
            if self.options.user:
                await self.execute("login")
            while True:
                prompt = f"{self.wallet.user or 'p2ppay'}> "
                try:
                    line = await self.terminal.read_line(prompt)
                except EOFError:
                    break
                if not await self.execute(line):
                    break
        except KeyboardInterrupt:
            pass
        self.say("")
        return ExitCode.OK

    async def run_script(self, script: str) -> int:
        for line in split_commands(script):
            if not await self.execute(line) or self.failed:
                break
        return self.status


def _policy(options: ClientOptions, terminal: Terminal) -> Policy:
    if options.accept == "all":
        return accept_all
    if options.accept == "none":
        return decline_all

    async def ask(offer: p.Offer) -> bool:
        # The memo is the payer's text: shown escaped, never obeyed (the payee checked it too).
        return await terminal.ask(
            f"{offer.payer} wants to pay you {offer.amount}{_for(offer.memo)}. Accept?"
        )

    return ask


async def run_client(options: ClientOptions, out: TextIO | None = None) -> int:
    """The ``p2ppay client`` command. Returns the process exit status."""
    out = out or sys.stdout
    try:
        ssl_context: ssl.SSLContext = client_context(options.cafile)
    except MissingCA as exc:
        print(f"p2ppay client: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    terminal, holding = make_terminal(
        interactive=options.commands is None, history_file=command_history_path()
    )
    peer_config = PeerConfig(
        decide_timeout=options.ask_timeout, answer_timeout=options.ask_timeout + 15
    )
    code: int = ExitCode.OK
    with holding():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal.run)
            try:
                async with Wallet.open(
                    options.host,
                    options.port,
                    ssl_context,
                    server_hostname=options.server_name,
                    policy=_policy(options, terminal),
                    listen_host=options.listen_host,
                    listen_port=options.listen_port or 0,
                    peer_config=peer_config,
                ) as wallet:
                    shell = Shell(wallet, terminal, options, out)
                    if isinstance(terminal.backend, RichBackend):
                        terminal.backend.complete = shell.complete
                        terminal.backend.toolbar = shell.toolbar
                    nursery.start_soon(shell.show_events)
                    try:
                        code = await _until_signalled(nursery, shell)
                    except OutputClosed:
                        # Nothing more can be said; a command that failed keeps its status.
                        code = shell.status or ExitCode.OUTPUT_CLOSED
                    if code == ExitCode.INTERRUPTED:
                        message = (
                            "interrupted; the command under way may or may not have been done "
                            "(history tells)"
                        )
                        error: dict[str, Any] = {"code": "interrupted", "message": message}
                        if shell.payment_id is not None:  # a payment was under way: which
                            message += f"; payment {shell.payment_id}: status tells"
                            error.update(message=message, payment_id=str(shell.payment_id))
                        if options.json:
                            _print_json(out, {"ok": False, "error": error})
                        print(f"p2ppay client: {message}", file=sys.stderr)
            except CannotConnect as exc:
                if options.json:
                    failure = {"code": "server_unreachable", "message": str(exc)}
                    _print_json(out, {"command": "connect", "ok": False, "error": failure})
                print(f"p2ppay client: {exc}", file=sys.stderr)
                code = ExitCode.UNREACHABLE
            nursery.cancel_scope.cancel()
    return code


def _print_json(out: TextIO, obj: dict[str, Any]) -> None:
    """A last JSON line on the way out; if nobody reads it any more, the exit status says
    what happened all the same."""
    try:
        print(json.dumps(obj), file=out, flush=True)
    except BrokenPipeError:
        quiet_stdout()


async def _until_signalled(nursery: trio.Nursery, shell: Shell) -> int:
    """Run the shell; SIGINT, SIGTERM and SIGHUP end it cleanly (the wallet then logs out).

    Stopping ``serve`` that way is how it is meant to end (exit 0), and so is leaving an
    interactive session; a script stopped in the middle of anything else exits 130."""
    code: int = ExitCode.OK
    interrupted = False
    with trio.CancelScope() as scope:

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal interrupted
            signals_ = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            with trio.open_signal_receiver(*signals_) as signals:
                task_status.started()
                async for _ in signals:
                    interrupted = shell.interactive is False and not shell.serving
                    scope.cancel()
                    return

        await nursery.start(watch)
        if shell.options.commands is not None:
            code = await shell.run_script(shell.options.commands)
        else:
            code = await shell.run_interactive()
    if interrupted:
        code = ExitCode.INTERRUPTED
    return code
