"""Who owns the terminal: one task asks every question, so a payment offer never garbles a
command being typed.

The shell asks for command lines; an offer's policy asks yes/no questions. Both go through a
:class:`Terminal`, whose single owner task puts one prompt on screen at a time: a question that
arrives while a command is being typed interrupts that prompt, is asked and answered, and the
command prompt comes back with what had been typed so far. On a real terminal the prompts are
prompt_toolkit's (history, line editing, output printed above the prompt), run in a worker
thread so the Trio loop keeps serving offers; from a pipe they are plain lines read without
blocking.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, final

import trio

from p2ppay.cli.exitcodes import quiet_stdout
from p2ppay.wire import LineBuffer

MAX_INPUT_LINE: Final = 64 * 1024

log = logging.getLogger("p2ppay.cli.terminal")


def printable(text: str) -> str:
    """``text`` safe to show on one line of a terminal: control characters (escape sequences,
    newlines, bells, bidirectional overrides) are shown as escapes, not obeyed. For whatever a
    peer or the server says: it must never be able to paint lines of its own on our screen."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A prompt was taken off the screen for a question; ``partial`` is what had been typed."""

    partial: str


class OutputClosed(Exception):
    """Whoever read the client's standard output has gone: nothing more can be said, so
    the client stops (not an ``OSError``: it is not the server's or a peer's)."""


class Backend(Protocol):
    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        """Show ``message`` and return the line typed (EOFError at end of input).
        ``remember``: the line may go into the person's command history."""

    def interrupt(self) -> None:
        """Make the prompt on screen (or the next one) return :class:`Interrupted` soon."""

    def write(self, text: str) -> None:
        """Print a line without disturbing the prompt on screen."""


@final
class PlainBackend:
    """Lines from a pipe or file, read without blocking the event loop."""

    def __init__(self, fd: int = 0, out: TextIO | None = None) -> None:
        self._fd = fd
        self._stream: trio.lowlevel.FdStream | None = None  # opened at the first prompt
        self._lines = LineBuffer(MAX_INPUT_LINE)
        self._out = out or sys.stdout
        self._scope: trio.CancelScope | None = None
        self._interrupt_pending = False
        self._eof = False

    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        if message:
            self._say(message)
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._interrupt_pending:
                scope.cancel()
            while (line := self._lines.next_line()) is None:
                if self._eof:
                    raise EOFError
                data = await self._read()
                if not data:
                    self._eof = True
                    if self._lines.pending:  # a last line without its newline
                        self._lines.feed(b"\n")
                    continue
                self._lines.feed(data)
            self._scope = None
            self._interrupt_pending = False  # came too late: this prompt ended by itself
            return line.decode("utf-8", errors="replace").rstrip("\r")
        self._scope = None
        self._interrupt_pending = False
        self._out.write("\n")
        return Interrupted("")  # bytes already read stay buffered for the next prompt

    async def _read(self) -> bytes:
        mode = os.fstat(self._fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(self._fd)):
            # A regular file or /dev/null: never blocks, and cannot be polled.
            await trio.lowlevel.checkpoint()
            return os.read(self._fd, 4096)
        if self._stream is None:
            self._stream = trio.lowlevel.FdStream(os.dup(self._fd))
        return bytes(await self._stream.receive_some(4096))

    def interrupt(self) -> None:
        self._interrupt_pending = True
        if self._scope is not None:
            self._scope.cancel()

    def write(self, text: str) -> None:
        self._say(text + "\n")

    def _say(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except BrokenPipeError:
            # (``client -c "history --csv" | head``): whoever reads our output has gone;
            # the client stops there, as a program writing to a closed pipe does.
            quiet_stdout()
            raise OutputClosed("standard output was closed") from None


def open_history_file(path: Path) -> Path:
    """Make sure the command history file exists, readable by its owner only (commands name
    people and amounts); its directory is made if need be. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # an older file may have been made with wider permissions
    return path


def _command_history(path: Path | None) -> Any:
    """A prompt_toolkit history kept in ``path`` across runs, that records only what it is
    told to (command lines: never passwords, never answers to offers)."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    class CommandHistory(FileHistory):
        recording = False

        def append_string(self, string: str) -> None:
            if self.recording:
                super().append_string(string)

    class MemoryHistory(InMemoryHistory):
        recording = False

        def append_string(self, string: str) -> None:
            if self.recording:
                super().append_string(string)

    if path is not None:
        try:
            return CommandHistory(str(open_history_file(path)))
        except OSError as exc:
            log.warning("command history not kept: %s: %s", path, exc.strerror or exc)
    return MemoryHistory()


@final
class RichBackend:
    """prompt_toolkit prompts, each run in a worker thread while the Trio loop goes on.

    ``complete`` (the words that may follow the text before the cursor) and ``toolbar`` (the
    line under the prompt) may be set at any time; both are called from the prompt's thread,
    so they must only read."""

    def __init__(self, history_file: Path | None = None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import Completer, Completion
        from prompt_toolkit.document import Document

        backend = self
        self.complete: Callable[[str], list[str]] | None = None
        self.toolbar: Callable[[], str] | None = None
        self._secret = False

        class _Words(Completer):
            def get_completions(self, document: Document, event: Any) -> Iterator[Completion]:
                if backend._secret or backend.complete is None:
                    return
                before = document.text_before_cursor
                current = before.rsplit(" ", 1)[-1]
                for word in backend.complete(before):
                    yield Completion(word, start_position=-len(current))

        self._history: Any = _command_history(history_file)
        self._session: Any = PromptSession(
            history=self._history,
            completer=_Words(),
            complete_while_typing=False,  # Tab completes; typing is left alone
            bottom_toolbar=self._toolbar_text,
        )
        self._interrupt_pending = False
        self._ending = False  # the prompt was cancelled: end it, and any not yet started
        #: a prompt is on screen, or its thread is starting or ending
        self._prompting = False

    def _toolbar_text(self) -> str | None:
        return None if self.toolbar is None else self.toolbar()

    async def prompt(
        self, message: str, default: str, secret: bool, *, remember: bool = False
    ) -> str | Interrupted:
        # The prompt blocks its thread until a line is typed. So that a cancellation (SIGTERM,
        # the end of the client) does not wait for the person, the wait for the thread is
        # abandoned at once; then the prompt is told to end, and the thread is waited for
        # (shielded, and promptly): it never outlives this call.
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        results: list[str | Interrupted] = []
        errors: list[BaseException] = []
        self._ending = False

        def run() -> None:
            self._secret = secret
            self._history.recording = remember and not secret
            try:
                results.append(self._prompt_blocking(message, default, secret))
            except BaseException as exc:  # EOFError, KeyboardInterrupt: the caller's to see
                errors.append(exc)
            finally:
                token.run_sync_soon(done.set)

        self._prompting = True
        try:
            try:
                await trio.to_thread.run_sync(run, abandon_on_cancel=True)
            except trio.Cancelled:
                self._ending = True
                self._wake_prompt()
                with trio.CancelScope(shield=True):
                    await done.wait()
                raise
            await done.wait()
        finally:
            self._prompting = False  # (its thread has finished)
        self._interrupt_pending = False
        if errors:
            raise errors[0]
        return results[0]

    def _prompt_blocking(self, message: str, default: str, secret: bool) -> str | Interrupted:
        result: str | Interrupted = self._session.prompt(
            message,
            default=default,
            is_password=secret,
            pre_run=self._exit_if_interrupted,
        )
        return result

    def _exit_if_interrupted(self) -> None:
        # Runs in prompt_toolkit's loop: as the prompt starts (pre_run) or when woken.
        app = self._session.app
        if not app.is_running or app.future.done():
            return
        if self._ending:
            app.exit(exception=EOFError())  # the client is ending: no more prompting
        elif self._interrupt_pending:
            app.exit(result=Interrupted(app.current_buffer.text))

    def interrupt(self) -> None:
        self._interrupt_pending = True
        self._wake_prompt()

    def _wake_prompt(self) -> None:
        app = self._session.app
        loop = getattr(app, "loop", None)
        if app.is_running and loop is not None:
            loop.call_soon_threadsafe(self._exit_if_interrupted)

    def write(self, text: str) -> None:
        if self._prompting:
            print(text, flush=True)  # patch_stdout() puts it above the prompt
            return
        # No prompt: straight to the terminal, at once. Through patch_stdout's proxy the
        # line would be written later by its own thread, which could then meet the next
        # prompt as it starts in another thread (a prompt that never appeared was seen).
        stream = getattr(sys.stdout, "original_stdout", None) or sys.__stdout__
        if stream is not None:
            stream.write(text + "\n")
            stream.flush()


@dataclass(eq=False, slots=True)
class _Question:
    text: str
    done: trio.Event = field(default_factory=trio.Event)
    answer: str | None = None
    cancelled: bool = False


@final
class Terminal:
    """Serialises every prompt through one owner task (run :meth:`run` in a nursery)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._questions: deque[_Question] = deque()
        self._wakeup = trio.Event()
        self._command_wanted: tuple[str, bool] | None = None
        self._command_result: tuple[str | None, BaseException | None] | None = None
        self._command_done = trio.Event()
        self._current: _Question | None = None
        self._saved = ""
        #: a command line is on screen (a question arriving takes it off, for a while)
        self._prompting_command = False

    def write(self, text: str) -> None:
        self.backend.write(text)

    def _wake(self) -> None:
        self._wakeup.set()

    async def read_line(self, prompt: str, *, secret: bool = False) -> str:
        """A line typed at ``prompt``; raises EOFError at end of input, KeyboardInterrupt on
        Ctrl-C at a rich terminal."""
        self._command_wanted = (prompt, secret)
        self._command_done = trio.Event()
        self._wake()
        await self._command_done.wait()
        assert self._command_result is not None
        line, error = self._command_result
        self._command_result = None
        if error is not None:
            raise error
        assert line is not None
        return line

    async def ask(self, question: str) -> bool:
        """Ask a yes/no question; an unanswered question (cancelled) counts as no."""
        q = _Question(question)
        self._questions.append(q)
        if self._prompting_command:
            # Only a command line gives way to a question (it comes back after); a question
            # on screen is answered first, and with no prompt up there is nothing to take off.
            self.backend.interrupt()
        self._wake()
        try:
            await q.done.wait()
        finally:
            if not q.done.is_set():
                q.cancelled = True
                if q in self._questions:
                    self._questions.remove(q)
                if self._current is q:
                    self.backend.interrupt()
        return (q.answer or "").strip().lower() in ("y", "yes")

    async def run(self) -> None:
        """The owner task: forever, put the most urgent prompt on screen."""
        while True:
            if self._questions:
                q = self._questions.popleft()
                self._current = q
                try:
                    answer = await self.backend.prompt(f"{q.text} [y/N] ", "", False)
                except (EOFError, KeyboardInterrupt):
                    answer = ""
                self._current = None
                if isinstance(answer, Interrupted):
                    if q.cancelled:
                        self.write("(no answer in time: declined)")
                    answer = ""
                q.answer = answer
                q.done.set()
                continue
            if self._command_wanted is not None:
                prompt, secret = self._command_wanted
                self._prompting_command = True
                try:
                    line = await self.backend.prompt(
                        prompt, "" if secret else self._saved, secret, remember=not secret
                    )
                except (EOFError, KeyboardInterrupt) as exc:
                    self._finish_command(None, exc)
                    continue
                finally:
                    self._prompting_command = False
                if isinstance(line, Interrupted):
                    self._saved = line.partial
                    continue  # a question came: ask it, then prompt again
                self._saved = ""
                self._finish_command(line, None)
                continue
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def _finish_command(self, line: str | None, error: BaseException | None) -> None:
        self._command_wanted = None
        self._command_result = (line, error)
        self._command_done.set()


def make_terminal(
    interactive: bool, history_file: Path | None = None
) -> tuple[Terminal, Callable[[], Any]]:
    """The terminal for this process, and a context manager to hold while it is in use.
    At a real terminal, command lines are kept in ``history_file`` across runs."""
    import contextlib

    if interactive and sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit.patch_stdout import patch_stdout

        return Terminal(RichBackend(history_file)), lambda: patch_stdout(raw=True)
    return Terminal(PlainBackend()), contextlib.nullcontext
