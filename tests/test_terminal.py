"""The terminal in-process: :class:`PlainBackend` reading lines from pipes and files, and the
:class:`Terminal` owner task putting one prompt on screen at a time (a scripted backend)."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from p2ppay.cli.terminal import Interrupted, PlainBackend, Terminal, make_terminal


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass  # closed by the test (EOF)


# --- PlainBackend -----------------------------------------------------------------------------


async def test_lines_from_a_pipe(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    out = io.StringIO()
    backend = PlainBackend(read_fd, out)
    os.write(write_fd, b"deposit 5\r\nlist\n\n")
    with trio.fail_after(5):
        assert await backend.prompt("p2ppay> ", "", False) == "deposit 5"  # \r\n too
        assert await backend.prompt("p2ppay> ", "", False) == "list"
        assert await backend.prompt("", "", False) == ""  # a blank line is a line
        # Nothing written yet: the prompt waits without blocking the event loop.
        async with trio.open_nursery() as nursery:
            got: list[str | Interrupted] = []

            async def read() -> None:
                got.append(await backend.prompt("name: ", "", False))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            os.write(write_fd, "h\u00e9\n".encode())
        assert got == ["h\u00e9"]
        # A last line without its newline still counts; then the end of input.
        os.write(write_fd, b"exit")
        os.close(write_fd)
        assert await backend.prompt("> ", "", False) == "exit"
        with pytest.raises(EOFError):
            await backend.prompt("> ", "", False)
        with pytest.raises(EOFError):  # and it stays at the end
            await backend.prompt("> ", "", False)
    assert out.getvalue() == "p2ppay> p2ppay> name: > > > "


async def test_lines_from_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "commands.txt"
    path.write_bytes(b"register alice\nlogin alice\nbad \xff byte\nno newline")
    fd = os.open(path, os.O_RDONLY)
    try:
        backend = PlainBackend(fd, io.StringIO())
        with trio.fail_after(5):
            lines = [await backend.prompt("", "", False) for _ in range(4)]
            with pytest.raises(EOFError):
                await backend.prompt("", "", False)
    finally:
        os.close(fd)
    assert lines == ["register alice", "login alice", "bad \ufffd byte", "no newline"]


async def test_an_empty_file_is_the_end_of_input(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with trio.fail_after(5), pytest.raises(EOFError):
            await PlainBackend(fd, io.StringIO()).prompt("> ", "", False)
    finally:
        os.close(fd)


async def test_an_interrupted_prompt_keeps_what_was_read(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    out = io.StringIO()
    backend = PlainBackend(read_fd, out)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            got: list[str | Interrupted] = []

            async def read() -> None:
                got.append(await backend.prompt("p2ppay> ", "", False))

            nursery.start_soon(read)
            os.write(write_fd, b"pay bo")  # typed, not yet entered
            await trio.testing.wait_all_tasks_blocked()
            backend.interrupt()
        assert got == [Interrupted("")]
        assert out.getvalue() == "p2ppay> \n"
        # The bytes read so far are the start of the next prompt's line.
        os.write(write_fd, b"b 5\n")
        assert await backend.prompt("p2ppay> ", "", False) == "pay bob 5"
        # An interrupt that comes before the prompt takes it off at once.
        backend.interrupt()
        assert await backend.prompt("question? ", "", False) == Interrupted("")
        os.write(write_fd, b"y\n")
        assert await backend.prompt("question? ", "", False) == "y"


def test_write_prints_a_line() -> None:
    out = io.StringIO()
    PlainBackend(0, out).write("Balance: 5")
    assert out.getvalue() == "Balance: 5\n"


def test_a_terminal_that_is_not_a_tty_is_plain() -> None:
    terminal, holding = make_terminal(interactive=True)  # pytest's stdin is not a tty
    assert isinstance(terminal.backend, PlainBackend)
    with holding():
        pass
    terminal, _ = make_terminal(interactive=False)
    assert isinstance(terminal.backend, PlainBackend)


# --- Terminal, over a scripted backend ---------------------------------------------------------


class Scripted:
    """A backend whose person types what the test sends; ``typing`` is the line half typed
    when a prompt is interrupted. A ``lagging`` one takes the prompt on screen off only at
    the next prompt (as a rich prompt still starting up would)."""

    def __init__(self, *, lagging: bool = False) -> None:
        self.lagging = lagging
        self.prompts: list[tuple[str, str, bool]] = []
        self.written: list[str] = []
        self.typing = ""
        self.send, self._receive = trio.open_memory_channel[str | BaseException](10)
        self._scope: trio.CancelScope | None = None
        self._pending = False
        self.prompting = trio.Event()

    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        self.prompts.append((message, default, secret))
        self.prompting.set()
        with trio.CancelScope() as self._scope:
            if self._pending:
                self._scope.cancel()
            item = await self._receive.receive()
            if isinstance(item, BaseException):
                raise item
            return item
        self._pending = False
        self.prompting = trio.Event()
        return Interrupted(self.typing)

    def interrupt(self) -> None:
        self._pending = True
        if self._scope is not None and not self.lagging:
            self._scope.cancel()

    def write(self, text: str) -> None:
        self.written.append(text)


@asynccontextmanager
async def owned(backend: Scripted) -> AsyncIterator[Terminal]:
    terminal = Terminal(backend)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminal.run)
        yield terminal
        nursery.cancel_scope.cancel()


async def test_a_question_interrupts_the_command_being_typed() -> None:
    backend = Scripted()
    with trio.fail_after(5):
        async with owned(backend) as terminal, trio.open_nursery() as nursery:
            lines: list[str] = []
            answers: list[bool] = []

            async def command() -> None:
                lines.append(await terminal.read_line("alice> "))

            async def question() -> None:
                answers.append(await terminal.ask("bob wants to pay you 5. Accept?"))

            nursery.start_soon(command)
            await trio.testing.wait_all_tasks_blocked()
            backend.typing = "pay ca"
            nursery.start_soon(question)
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send(" Yes ")
            await trio.testing.wait_all_tasks_blocked()
            assert answers == [True]
            await backend.send.send("pay carol 3")
        assert lines == ["pay carol 3"]
        assert backend.prompts == [
            ("alice> ", "", False),
            ("bob wants to pay you 5. Accept? [y/N] ", "", False),
            ("alice> ", "pay ca", False),  # back with what had been typed
        ]


async def test_a_secret_prompt_does_not_bring_back_what_was_typed() -> None:
    backend = Scripted()
    with trio.fail_after(5):
        async with owned(backend) as terminal, trio.open_nursery() as nursery:
            got: list[str] = []

            async def password() -> None:
                got.append(await terminal.read_line("password: ", secret=True))

            async def question() -> None:
                assert not await terminal.ask("Accept?")

            nursery.start_soon(password)
            await trio.testing.wait_all_tasks_blocked()
            backend.typing = "hunter"
            nursery.start_soon(question)
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send("n")
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send("hunter2")
        assert got == ["hunter2"]
        assert backend.prompts[-1] == ("password: ", "", True)


async def ask_at_the_command_prompt(
    terminal: Terminal, backend: Scripted, answer: str | BaseException
) -> bool:
    """Ask a question while a command line is being typed; answer it with ``answer``, then
    finish the command line."""
    answers: list[bool] = []
    lines: list[str] = []
    async with trio.open_nursery() as nursery:

        async def command() -> None:
            lines.append(await terminal.read_line("> "))

        async def question() -> None:
            answers.append(await terminal.ask("Accept?"))

        nursery.start_soon(command)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(question)
        await trio.testing.wait_all_tasks_blocked()
        await backend.send.send(answer)
        await trio.testing.wait_all_tasks_blocked()
        await backend.send.send("list")
    assert lines == ["list"]
    return answers[0]


async def test_end_of_input_and_ctrl_c_at_the_prompts() -> None:
    backend = Scripted()
    with trio.fail_after(5):
        async with owned(backend) as terminal:
            await backend.send.send(EOFError())
            with pytest.raises(EOFError):
                await terminal.read_line("> ")
            await backend.send.send(KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                await terminal.read_line("> ")
            # At a question, either one is a no, and the command prompt comes back.
            assert not await ask_at_the_command_prompt(terminal, backend, EOFError())
            assert not await ask_at_the_command_prompt(terminal, backend, KeyboardInterrupt())
            assert await ask_at_the_command_prompt(terminal, backend, "y")
            assert not await ask_at_the_command_prompt(terminal, backend, "maybe")


async def test_a_question_not_answered_in_time_is_declined(
    autojump_clock: trio.testing.MockClock, pipe: tuple[int, int]
) -> None:
    read_fd, write_fd = pipe
    out = io.StringIO()
    terminal = Terminal(PlainBackend(read_fd, out))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminal.run)
        lines: list[str] = []

        async def command() -> None:
            lines.append(await terminal.read_line("alice> "))

        nursery.start_soon(command)
        await trio.testing.wait_all_tasks_blocked()
        decision = False  # what the offer listener decides when its policy is cut short
        with trio.move_on_after(30) as waited:  # as the offer listener bounds its policy
            decision = await terminal.ask("bob wants to pay you 5. Accept?")
        assert waited.cancelled_caught and decision is False
        await trio.testing.wait_all_tasks_blocked()
        assert out.getvalue() == (
            "alice> \n"
            "bob wants to pay you 5. Accept? [y/N] \n(no answer in time: declined)\n"
            "alice> "
        )
        # The command prompt is back and takes the next line.
        os.write(write_fd, b"balance\n")
        with trio.fail_after(5):
            while not lines:
                await trio.testing.wait_all_tasks_blocked()
        assert lines == ["balance"]
        nursery.cancel_scope.cancel()


async def test_a_question_given_up_before_it_is_asked_is_never_shown() -> None:
    backend = Scripted(lagging=True)
    with trio.fail_after(5):
        async with owned(backend) as terminal, trio.open_nursery() as nursery:
            lines: list[str] = []

            async def command() -> None:
                lines.append(await terminal.read_line("> "))

            nursery.start_soon(command)
            await trio.testing.wait_all_tasks_blocked()
            decision = False
            with trio.move_on_after(0.01):  # the payer gives up before it reaches the screen
                decision = await terminal.ask("bob wants to pay you 5. Accept?")
            assert decision is False
            await backend.send.send("history")
        assert lines == ["history"]
        assert backend.prompts == [("> ", "", False)]
        assert backend.written == []  # no "(no answer in time)" for a question never shown


async def test_a_second_question_waits_for_the_first() -> None:
    backend = Scripted()
    answers: dict[str, bool] = {}
    with trio.fail_after(5):
        async with owned(backend) as terminal, trio.open_nursery() as nursery:

            async def command() -> None:
                await terminal.read_line("> ")

            async def question(who: str) -> None:
                answers[who] = await terminal.ask(f"{who} wants to pay you 5. Accept?")

            nursery.start_soon(command)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(question, "bob")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(question, "carol")
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send("y")  # to bob
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send("n")  # to carol
            await trio.testing.wait_all_tasks_blocked()
            await backend.send.send("list")
    assert answers == {"bob": True, "carol": False}


async def test_a_question_asked_while_no_prompt_is_up_waits_for_its_answer(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    out = io.StringIO()
    terminal = Terminal(PlainBackend(read_fd, out))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal.run)
            await trio.testing.wait_all_tasks_blocked()
            answers: list[bool] = []

            async def question() -> None:
                answers.append(await terminal.ask("bob wants to pay you 5. Accept?"))

            nursery.start_soon(question)
            await trio.testing.wait_all_tasks_blocked()
            os.write(write_fd, b"y\n")
            with trio.move_on_after(1):
                while not answers:
                    await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert answers == [True]
