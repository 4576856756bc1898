"""The terminal client: interactive shell and scripted commands, over the Wallet."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import signal
import ssl
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO, TypeVar, final

import msgspec
import trio

from . import protocol as p
from .client import ClientError, ConnectionLost, ServerError
from .constraints import MAX_HISTORY, MAX_PORT, MIN_PORT, is_port, memo_problem, parse_duration
from .exitcodes import ExitCode
from .names import NAME_MAX, is_valid_name
from .peer import PeerConfig, Policy, accept_all, decline_all
from .terminal import Terminal, make_terminal, printable
from .tls import MissingCA, client_context
from .wallet import (
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
  pay NAME AMOUNT [--memo TEXT]
                      pay NAME directly; they accept or decline
  pay --request ID    pay a request someone made to you
  request NAME AMOUNT [--memo TEXT] [--expires 2h]
                      ask NAME to pay you (they can pay while you are away)
  requests            open requests to you and from you, with their ids
  decline-request ID  say no to a request made to you
  cancel-request ID   take back a request you made
  receipt ID [--out FILE]
                      the server's signed receipt of a payment (JSON)
  passwd              change your password
  history [N]         your last N movements (default 20)
  logout              log out (stop taking payments)
  serve               stay online taking offers until Ctrl-C or SIGTERM
  help                this text
  exit                log out and leave (also Ctrl-D)
The seed program's menu works too: 1 register, 2 login, 3 list, 4 pay, 5 exit.
Amounts are whole numbers."""

MENU: Final = {"1": "register", "2": "login", "3": "list", "4": "pay", "5": "exit"}
NEEDS_LOGIN: Final = frozenset(
    {"deposit", "balance", "list", "pay", "history", "logout", "serve"}
    | {"request", "requests", "decline-request", "cancel-request", "receipt", "passwd"}
)
#: the most words each command takes after its name
MAX_ARGS: Final = {
    "register": 1,
    "login": 1,
    "deposit": 1,
    "balance": 0,
    "list": 0,
    "pay": 2,
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
#: the options each command takes (each with a value): ``--memo TEXT`` or ``--memo=TEXT``
OPTIONS: Final = {
    "pay": frozenset({"--memo", "--request"}),
    "request": frozenset({"--memo", "--expires"}),
    "receipt": frozenset({"--out"}),
    "deposit": frozenset({"--id"}),
}


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
    """How many movements ``history`` shows."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_HISTORY:
        raise UsageError(
            f"the number of movements must be a whole number from 1 to {MAX_HISTORY} (not {text!r})"
        )
    return int(text)


def parse_port(text: str) -> int:
    """A P2P port, or 0 for "any free port" when left empty."""
    if not text:
        return 0
    if not text.isdigit() or not is_port(int(text)):
        raise UsageError(f"the port must be a number from {MIN_PORT} to {MAX_PORT} (not {text!r})")
    return int(text)


def split_options(command: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The plain words and the options (``--memo TEXT`` or ``--memo=TEXT``) of a command."""
    known = OPTIONS.get(command, frozenset())
    words: list[str] = []
    options: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            flag, eq, value = arg.partition("=")
            if flag not in known:
                raise UsageError(f"{command} does not take {flag!r}; type help for the usage")
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{flag} needs a value")
                value = args[i + 1]
                i += 1
            if flag in options:
                raise UsageError(f"{flag} is given twice")
            options[flag] = value
        else:
            words.append(arg)
        i += 1
    return words, options


def parse_memo(text: str) -> str:
    problem = memo_problem(text)
    if problem is not None:
        raise UsageError(problem)
    return text


def parse_id(text: str, what: str = "id") -> uuid.UUID:
    """A payment, request or deposit id: a UUID (shown in canonical form everywhere)."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a {what} (a UUID like 5f0c...-...)") from None


def parse_expiry(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _for(memo: str | None) -> str:
    """`` for "memo"``, escaped, or nothing."""
    return "" if memo is None else f' for "{printable(memo)}"'


def format_requests(result: p.RequestsResult) -> str:
    lines: list[str] = []
    for title, requests, other in (
        ("Asking you to pay", result.incoming, "FROM"),
        ("Your requests", result.outgoing, "TO"),
    ):
        lines.append(f"{title} ({len(requests)}):")
        if not requests:
            continue
        width = max(
            len(other), *(len(r.requester if other == "FROM" else r.payer) for r in requests)
        )
        lines.append(f"  {'ID':<36}  {other:<{width}}  {'AMOUNT':>10}  {'EXPIRES':<19}  MEMO")
        for r in requests:
            who = r.requester if other == "FROM" else r.payer
            lines.append(
                f"  {r.request_id!s:<36}  {who:<{width}}  {r.amount:>10}  "
                f"{_when(r.expires_ms):<19}  {printable(r.memo or '')}".rstrip()
            )
    return "\n".join(lines)


def describe_request_closed(r: p.RequestInfo) -> str:
    what = f"request {r.request_id} for {r.amount}{_for(r.memo)}"
    if r.state == "paid":
        return f"{r.payer} paid your {what}."
    if r.state == "declined":
        return f"{r.payer} declined your {what}."
    return f"{r.requester} cancelled the {what}."


def split_commands(script: str) -> list[str]:
    return [part.strip() for part in re.split(r"[;\n]", script) if part.strip()]


def _when(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


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
        f"  {'WHEN':<19}  {'KIND':<8}  {'AMOUNT':>10}  {'BALANCE':>10}  {'WITH':<{width}}  MEMO"
    ]
    for e in entries:
        lines.append(
            f"  {_when(e.at_ms):<19}  {e.kind:<8}  {e.amount:>10}  {e.balance:>10}  "
            f"{e.counterparty or '':<{width}}  {printable(e.memo or '')}".rstrip()
        )
    return "\n".join(lines)


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
        #: the options of the command being run (``--memo``: its value)
        self._opts: dict[str, str] = {}

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
        if self.options.json:
            self._json(
                {"command": command, "ok": False, "error": {"code": code, "message": message}}
            )
        else:
            self.terminal.write(f"Error ({code}): {printable(message)}")

    def _json(self, obj: dict[str, Any]) -> None:
        self.terminal.write(json.dumps(obj, sort_keys=True))

    async def show_events(self) -> None:
        async for event in self.wallet.events:
            self.show_event(event)

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
            text = (
                f"{r.requester} asks you to pay {r.amount}{_for(r.memo)} by "
                f"{_when(r.expires_ms)}: pay --request {r.request_id} (or decline-request)"
            )
        elif isinstance(event, p.RequestClosed):
            text = describe_request_closed(event.request)
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
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            self.emit_error(
                line.split()[0].lower(), "usage", f"cannot read that line: {exc}", ExitCode.USAGE
            )
            return True
        if not words:
            return True
        command, args = words[0].lower(), words[1:]
        command = MENU.get(command, command)
        try:
            args, self._opts = split_options(command, args)
            if len(args) > MAX_ARGS.get(command, len(args)):
                extra = " ".join(args[MAX_ARGS[command] :])
                raise UsageError(f"{command} does not take {extra!r}; type help for the usage")
            return await self._execute(command, args)
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

    async def _execute(self, command: str, args: list[str]) -> bool:
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
        opts = self._opts
        if command == "deposit":
            amount = await self._amount(args, 0)
            did = parse_id(opts["--id"], "deposit id") if "--id" in opts else None
            balance = await wallet.deposit(amount, did)
            self.emit("deposit", {"balance": balance}, f"Deposited {amount}. Balance: {balance}")
        elif command == "balance":
            balance = await wallet.balance()
            self.emit("balance", {"balance": balance}, f"Balance: {balance}")
        elif command == "list":
            result = await wallet.list()
            self.emit("list", result, format_list(result))
        elif command == "pay" and "--request" in opts:
            if args or "--memo" in opts:
                raise UsageError(
                    "pay --request ID takes no name, amount or memo: the request has them"
                )
            paid = await wallet.pay_request(parse_id(opts["--request"], "request id"))
            self.emit(
                "pay",
                paid,
                f"Paid {paid.amount}{_for(paid.memo)} to {paid.payee} (payment "
                f"{paid.payment_id}). Your balance: {paid.balance}",
            )
        elif command == "pay":
            payee = parse_name(args[0]) if args else await self._prompted("payee: ", parse_name)
            amount = await self._amount(args, 1)
            memo = parse_memo(opts["--memo"]) if "--memo" in opts else None
            paid = await wallet.pay(
                payee,
                amount,
                on_offer=lambda o: self.say(f"Offering {o.amount} to {o.payee}..."),
                memo=memo,
            )
            self.emit(
                "pay",
                paid,
                f"Paid {paid.amount}{_for(paid.memo)} to {paid.payee} (payment "
                f"{paid.payment_id}). Your balance: {paid.balance}",
            )
        elif command == "request":
            payer = parse_name(args[0]) if args else await self._prompted("from: ", parse_name)
            amount = await self._amount(args, 1)
            memo = parse_memo(opts["--memo"]) if "--memo" in opts else None
            expires = parse_expiry(opts["--expires"]) if "--expires" in opts else None
            made = await wallet.request(payer, amount, memo, expires)
            self.emit(
                "request",
                made,
                f"Asked {made.payer} to pay you {made.amount}{_for(made.memo)} (request "
                f"{made.request_id}, open until {_when(made.expires_ms)}).",
            )
        elif command == "requests":
            listed = await wallet.requests()
            self.emit("requests", listed, format_requests(listed))
        elif command in ("decline-request", "cancel-request"):
            if not args:
                raise UsageError(f"{command} needs a request id (see requests)")
            rid = parse_id(args[0], "request id")
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
            receipt = msgspec.to_builtins(await wallet.receipt(parse_id(args[0], "payment id")))
            text = json.dumps(receipt, indent=2, sort_keys=True)
            if "--out" in opts:
                out = trio.Path(opts["--out"])
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
            limit = parse_count(args[0]) if args else 20
            entries = await wallet.history(limit)
            self.emit("history", {"entries": entries}, format_history(entries))
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
    terminal, holding = make_terminal(interactive=options.commands is None)
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
                    nursery.start_soon(shell.show_events)
                    code = await _until_signalled(nursery, shell)
                    if code == ExitCode.INTERRUPTED:
                        message = (
                            "interrupted; the command under way may or may not have been done "
                            "(history tells)"
                        )
                        if options.json:
                            error = {"code": "interrupted", "message": message}
                            print(json.dumps({"ok": False, "error": error}), file=out, flush=True)
                        print(f"p2ppay client: {message}", file=sys.stderr)
            except CannotConnect as exc:
                if options.json:
                    error = {"code": "server_unreachable", "message": str(exc)}
                    print(json.dumps({"command": "connect", "ok": False, "error": error}), file=out)
                print(f"p2ppay client: {exc}", file=sys.stderr)
                code = ExitCode.UNREACHABLE
            nursery.cancel_scope.cancel()
    return code


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
