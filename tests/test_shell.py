"""The shell in-process: commands typed at a scripted terminal, run against a real wallet and
server on loopback, and what the person is shown (text and JSON)."""

from __future__ import annotations

import io
import json
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.cli.shell import HELP, PASSWORD_ENV, ClientOptions, Shell
from p2ppay.cli.terminal import Interrupted, Terminal
from p2ppay.client.connection import Client
from p2ppay.client.peer import accept_all
from p2ppay.client.wallet import (
    Disconnected,
    LoggedOut,
    NotSettledNews,
    OfferAnswered,
    Reconnected,
    Wallet,
)

from .conftest import PASSWORD, Open


class Typist:
    """A person at the terminal who types ``lines`` in order, one per prompt, then Ctrl-D
    (an exception in the list is raised at its prompt instead)."""

    def __init__(self, lines: Iterable[str | BaseException] = ()) -> None:
        self.lines: deque[str | BaseException] = deque(lines)
        self.prompts: list[str] = []
        self.written: list[str] = []

    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        await trio.lowlevel.checkpoint()
        self.prompts.append(message + ("(secret)" if secret else ""))
        if not self.lines:
            raise EOFError
        line = self.lines.popleft()
        if isinstance(line, BaseException):
            raise line
        return line

    def interrupt(self) -> None:
        pass

    def write(self, text: str) -> None:
        self.written.append(text)


@pytest.fixture(autouse=True)
def no_password_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


WalletAt = Callable[[], AbstractAsyncContextManager[Wallet]]


@pytest.fixture
def wallet_at(server_port: int, client_ctx: ssl.SSLContext) -> WalletAt:
    @asynccontextmanager
    async def _wallet() -> AsyncIterator[Wallet]:
        def connect() -> AbstractAsyncContextManager[Client]:
            return Client.connect(
                "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
            )

        async with Wallet.using(connect, policy=accept_all, listen_host="127.0.0.1") as wallet:
            yield wallet

    return _wallet


def options(**kw: Any) -> ClientOptions:
    return ClientOptions(host="127.0.0.1", port=1, cafile=Path("unused.pem"), **kw)


@asynccontextmanager
async def shell_on(wallet: Wallet, typist: Typist, opts: ClientOptions) -> AsyncIterator[Shell]:
    terminal = Terminal(typist)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminal.run)
        shell = Shell(wallet, terminal, opts, io.StringIO())
        nursery.start_soon(shell.show_events)
        yield shell
        nursery.cancel_scope.cancel()


async def test_an_interactive_session(wallet_at: WalletAt, open_wallet: Open) -> None:
    typist = Typist(
        [
            "help",
            "   ",
            "register",
            "bad name!",  # name:
            "carol",
            "",  # password: empty
            "first",
            "second",  # again: differs
            "carol's secret",
            "carol's secret",
            "login",
            "carol",
            "carol's secret",
            "80",  # port for payments: not allowed
            "",  # any free one
            "deposit",
            "lots",  # amount:
            "50",
            "balance",
            "history",
            "list",
            "pay",
            "dave",  # payee:
            "5",  # amount:
            "4",  # the seed program's menu: pay
            EOFError(),  # payee: Ctrl-D gives up
            "pay dave 20",
            "history 2",
            "logout",
            "exit",
            "never read",
        ]
    )
    with trio.fail_after(30):
        async with open_wallet("dave") as dave, wallet_at() as wallet:
            async with shell_on(wallet, typist, options()) as shell:
                assert await shell.run_interactive() == ExitCode.OK
            assert await dave.balance() == 25
    assert typist.lines == deque(["never read"])
    shown = "\n".join(typist.written)
    assert typist.written[0] == "p2ppay client. Type help for the commands."
    assert HELP in typist.written
    assert "'bad name!' is not a valid name" in shown
    assert "The password cannot be empty." in typist.written
    assert "The two passwords differ; try again." in typist.written
    assert "Registered carol. Now log in: login carol" in typist.written
    assert "the port must be a number from 1024 to 65535 (not '80')" in typist.written
    assert wallet.user is None  # logged out
    login = next(line for line in typist.written if line.startswith("Logged in as carol"))
    assert login.startswith("Logged in as carol. Balance: 0. Taking payments on port ")
    assert "the amount must be a positive whole number, like 300 (not 'lots')" in shown
    assert "Deposited 50. Balance: 50" in typist.written
    assert "Balance: 50" in typist.written
    assert "Offering 5 to dave..." in typist.written
    assert "(cancelled)" in typist.written
    paid = [line for line in typist.written if line.startswith("Paid ")]
    assert len(paid) == 2 and paid[-1].endswith("Your balance: 25")
    assert "Logged out." in typist.written
    assert typist.prompts[:4] == ["p2ppay> ", "p2ppay> ", "p2ppay> ", "name: "]
    assert "password: (secret)" in typist.prompts and "again: (secret)" in typist.prompts
    assert "port for payments (Enter: any free port): " in typist.prompts
    assert "carol> " in typist.prompts
    history = typist.written[typist.written.index("Balance: 50") + 1]
    assert history.splitlines()[0].split() == [
        "WHEN",
        "(UTC)",
        "KIND",
        "AMOUNT",
        "BALANCE",
        "WITH",
        "MEMO",
    ]
    assert "deposit" in history.splitlines()[1]
    listing = typist.written[typist.written.index("Balance: 50") + 2]
    assert listing.splitlines()[:2] == ["Balance: 50", "Online (2):"]


async def test_ctrl_c_leaves_the_interactive_shell(wallet_at: WalletAt) -> None:
    typist = Typist(["help", KeyboardInterrupt(), "never read"])
    with trio.fail_after(10):
        async with wallet_at() as wallet, shell_on(wallet, typist, options()) as shell:
            assert await shell.run_interactive() == ExitCode.OK
    assert typist.lines == deque(["never read"])
    assert typist.written[-1] == ""


def erin_script(tmp_path: Path, commands: str) -> ClientOptions:
    """Options for a ``--json`` script run as erin, her password in a file (its first line)."""
    password_file = tmp_path / "erin.pw"
    password_file.write_text("erin's password\nignored\n")
    return options(user="erin", password_file=password_file, json=True, commands=commands)


async def test_a_script_in_json(wallet_at: WalletAt, open_wallet: Open, tmp_path: Path) -> None:
    opts = erin_script(
        tmp_path, "register; deposit 10; balance; list; history 5; pay dave 3; pay erin 1; list"
    )
    typist = Typist()
    with trio.fail_after(30):
        async with open_wallet("dave") as dave, wallet_at() as wallet:
            async with shell_on(wallet, typist, opts) as shell:
                assert opts.commands is not None
                assert await shell.run_script(opts.commands) == ExitCode.FAILED
                await trio.testing.wait_all_tasks_blocked()
            assert await dave.balance() == 3
    assert typist.prompts == []  # a script never asks
    replies = [json.loads(line) for line in typist.written]
    commands = [r.get("command") for r in replies if "command" in r]
    # The first failure ends the script: the last list is not run.
    assert commands == [
        "register",
        "login",
        "deposit",
        "balance",
        "list",
        "history",
        "pay",
        "pay",
    ]
    by_command = {r["command"]: r for r in replies if "command" in r}
    assert by_command["register"]["result"] == {"name": "erin"}
    assert by_command["balance"]["result"] == {"balance": 10}
    assert [u["name"] for u in by_command["list"]["result"]["online"]] == ["dave", "erin"]
    assert by_command["history"]["result"]["entries"][0]["kind"] == "deposit"
    # Every pay outcome carries its payment id, a refusal before anyone was asked too.
    pid = by_command["pay"]["error"].pop("payment_id")
    assert uuid.UUID(pid) and str(uuid.UUID(pid)) == pid
    assert by_command["pay"] == {
        "command": "pay",
        "ok": False,
        "error": {"code": "self_payment", "message": "you cannot pay yourself"},
    }
    assert not any(r.get("text", "").startswith("Offering") for r in replies)


async def test_pay_asks_whether_a_payment_was_settled_only_for_an_id_given(
    wallet_at: WalletAt, open_wallet: Open, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh id cannot have been paid: asking costs a round trip for nothing. An id the
    # user gives may have been (a retry): then it is asked.
    asked: list[uuid.UUID] = []
    status = Client.payment_status

    async def counted(self: Client, payment_id: uuid.UUID) -> p.PaymentStatusResult:
        asked.append(payment_id)
        return await status(self, payment_id)

    monkeypatch.setattr(Client, "payment_status", counted)
    retried = uuid.uuid4()
    opts = erin_script(tmp_path, f"register; deposit 10; pay dave 3; pay dave 2 --id {retried}")
    typist = Typist()
    with trio.fail_after(30):
        async with open_wallet("dave") as dave, wallet_at() as wallet:
            async with shell_on(wallet, typist, opts) as shell:
                assert opts.commands is not None
                assert await shell.run_script(opts.commands) == ExitCode.OK
            assert await dave.balance() == 5
    assert asked == [retried]


@pytest.mark.parametrize(
    ("script", "code", "message"),
    [
        ("register", "usage", "register needs a name (or --user)"),
        ("deposit 5", "usage", "log in first (login NAME)"),
        ("login bob", "usage", f"no password: use --password-file or set {PASSWORD_ENV}"),
        ("frobnicate", "usage", "unknown command 'frobnicate'; type help for the list"),
        ("frob --x", "usage", "unknown command 'frob'; type help for the list"),
        ("pay 'bob", "usage", 'cannot read "pay \'bob": a quote is not closed'),
        ("exit now", "usage", "exit does not take 'now'; type help for the usage"),
    ],
)
async def test_script_usage_errors(
    wallet_at: WalletAt, script: str, code: str, message: str
) -> None:
    typist = Typist()
    with trio.fail_after(10):
        async with (
            wallet_at() as wallet,
            shell_on(wallet, typist, options(commands=script)) as shell,
        ):
            assert await shell.run_script(script) == ExitCode.USAGE
    assert typist.written == [f"Error ({code}): {message}"]


async def test_missing_arguments_in_a_script(
    wallet_at: WalletAt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "fay's password")
    with trio.fail_after(10):
        async with wallet_at() as wallet:
            for script, message in [
                ("register fay; pay", "missing payee"),
                ("pay fay", "missing amount"),
                ("register fay", "already logged in; log out first"),  # the server says so
            ]:
                typist = Typist()
                opts = options(commands=script, user="fay")
                async with shell_on(wallet, typist, opts) as shell:
                    status = await shell.run_script(script)
                assert typist.written[-1].endswith(message), (script, typist.written)
                assert status is not ExitCode.OK


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the password file {path}: No such file or directory"),
        ("", "the password file {path} is empty"),
        ("\nsecond line\n", "the password file {path} is empty"),
    ],
)
async def test_a_password_file_that_cannot_be_used(
    wallet_at: WalletAt, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "pw"
    if content is not None:
        path.write_text(content)
    opts = options(commands="register gil", password_file=path)
    typist = Typist()
    with trio.fail_after(10):
        async with wallet_at() as wallet, shell_on(wallet, typist, opts) as shell:
            assert await shell.run_script("register gil") == ExitCode.USAGE
    assert typist.written == [f"Error (usage): {message.format(path=path)}"]


async def test_serve_stops_when_the_session_is_taken_over(
    wallet_at: WalletAt, open_wallet: Open
) -> None:
    typist = Typist()
    with trio.fail_after(30):
        async with open_wallet("hal") as other, wallet_at() as wallet:
            await other.logout()
            await wallet.login("hal", PASSWORD)
            async with shell_on(wallet, typist, options(commands="serve")) as shell:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(shell.run_script, "serve")
                    await trio.testing.wait_all_tasks_blocked()
                    await other.login("hal", PASSWORD)  # a newer login elsewhere
                assert shell.status is ExitCode.FAILED
    assert typist.written[0].startswith("Serving offers as hal on port ")
    assert "This session was closed: hal logged in from 127.0.0.1." in typist.written
    stopped = typist.written.index("Error (session_replaced): logged in elsewhere; stopped serving")
    assert typist.written.index("This session was closed: hal logged in from 127.0.0.1.") < stopped


PID = uuid.UUID(int=7)
OFFER = p.Offer(PID, "ida", "jo", 5)
EVENTS: list[tuple[Any, str, dict[str, Any]]] = [
    (
        p.PaymentReceived(PID, "ida", 5, 105),
        f"ida paid you 5 (payment {PID}). Your balance: 105",
        {
            "event": "payment_received",
            "payment_id": str(PID),
            "payer": "ida",
            "amount": 5,
            "balance": 105,
        },
    ),
    (
        OfferAnswered(OFFER, True),
        "You accepted ida's offer of 5; waiting for it to settle.",
        {
            "event": "offer_answered",
            "accepted": True,
            "offer": {
                "payment_id": str(PID),
                "payer": "ida",
                "payee": "jo",
                "amount": 5,
                "type": "offer",
            },
        },
    ),
    (
        OfferAnswered(OFFER, False),
        "You declined ida's offer of 5.",
        {
            "event": "offer_answered",
            "accepted": False,
            "offer": {
                "payment_id": str(PID),
                "payer": "ida",
                "payee": "jo",
                "amount": 5,
                "type": "offer",
            },
        },
    ),
    (
        p.SessionReplaced("jo logged in from 10.0.0.9"),
        "This session was closed: jo logged in from 10.0.0.9.",
        {"event": "session_replaced", "message": "jo logged in from 10.0.0.9"},
    ),
    (
        p.ServerClosing("the server is shutting down"),
        "The server is shutting down.",
        {"event": "server_closing", "message": "the server is shutting down"},
    ),
    (
        NotSettledNews("ida", p.NotSettled(PID, "insufficient funds")),
        f"ida's payment {PID} that you accepted did not go through: insufficient funds",
        {
            "event": "not_settled",
            "payer": "ida",
            "payment_id": str(PID),
            "reason": "insufficient funds",
        },
    ),
    (
        Reconnected("jo"),
        "Reconnected to the server; logged in again as jo.",
        {"event": "reconnected", "name": "jo"},
    ),
    (
        LoggedOut("could not log in again as jo: wrong password"),
        "Logged out: could not log in again as jo: wrong password.",
        {"event": "logged_out", "reason": "could not log in again as jo: wrong password"},
    ),
    (
        Disconnected("the connection to the server was lost", True),
        "Lost the connection to the server; reconnecting...",
        {
            "event": "disconnected",
            "reason": "the connection to the server was lost",
            "reconnecting": True,
        },
    ),
    (
        Disconnected("the connection to the server was lost", False),
        "Lost the connection to the server; the next command reconnects.",
        {
            "event": "disconnected",
            "reason": "the connection to the server was lost",
            "reconnecting": False,
        },
    ),
]


@pytest.mark.parametrize(("event", "text", "obj"), EVENTS)
async def test_how_events_are_shown(
    wallet_at: WalletAt, event: Any, text: str, obj: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        async with wallet_at() as wallet:
            human, machine = Typist(), Typist()
            Shell(wallet, Terminal(human), options(), io.StringIO()).show_event(event)
            Shell(wallet, Terminal(machine), options(json=True), io.StringIO()).show_event(event)
    assert human.written == [text]
    assert [json.loads(line) for line in machine.written] == [obj]
